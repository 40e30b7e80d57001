// A real DogStatsD client (hot-shots) sending to statsd-filter over a Unix socket.
//
//   node uds_client.js dgram  PATH COUNT   hot-shots protocol 'uds' (datagrams, via unix-dgram)
//   node uds_client.js stream PATH COUNT   hot-shots protocol 'stream' over node's own
//                                          net.createConnection(PATH): newline-framed lines
//
// Sends COUNT increments of hs.hits (tagged env:test), COUNT of debug.hs (for the proxy
// to block), one gauge hs.level = 7 and one timing hs.latency = 12, one at a time (each
// waits for the previous send's callback, so a busy receiver makes it wait, not drop),
// then closes and exits 0; any send error exits 1.
'use strict';

const net = require('net');
const StatsD = require('hot-shots');

const [mode, path, countText] = process.argv.slice(2);
const count = Number(countText);
if (!['dgram', 'stream'].includes(mode) || !path || !Number.isInteger(count)) {
  console.error('usage: node uds_client.js dgram|stream PATH COUNT');
  process.exit(2);
}

function fail(err) {
  console.error(`hot-shots ${mode}: ${err && (err.stack || err)}`);
  process.exit(1);
}

function makeClient(ready) {
  const common = { maxBufferSize: 0, errorHandler: fail, telegraf: false };
  if (mode === 'dgram') {
    // Retries cover EAGAIN/congestion while the proxy's receive queue is full.
    ready(new StatsD({ ...common, protocol: 'uds', path, udsRetryOptions: { retries: 50 } }));
    return;
  }
  const stream = net.createConnection(path, () => {
    ready(new StatsD({ ...common, protocol: 'stream', stream }));
  });
  stream.on('error', fail);
}

function send(client, method, args) {
  return new Promise((resolve, reject) => {
    client[method](...args, (err) => (err ? reject(err) : resolve()));
  });
}

makeClient(async (client) => {
  try {
    for (let i = 0; i < count; i++) {
      await send(client, 'increment', ['hs.hits', 1, ['env:test']]);
      await send(client, 'increment', ['debug.hs', 1]);
    }
    await send(client, 'gauge', ['hs.level', 7]);
    await send(client, 'timing', ['hs.latency', 12]);
  } catch (err) {
    fail(err);
  }
  client.close((err) => {
    if (err) fail(err);
    process.exit(0);
  });
});
