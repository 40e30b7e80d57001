#!/usr/bin/env node
/*
 * Oracle for statsd_filter.upstream.hashring: node placement computed by the real JS code
 * that Etsy StatsD 0.9.0's cluster proxy (node_modules/statsd/proxy.js) runs.
 *
 * stdin:  {"nodes": ["host:port", ...], "keys": ["metric.name", ...], "options": {...}}
 * stdout: {"<key>": "<host:port>" | null, ...}   (null: no node left, proxy.js drops the line)
 *
 * The ring is built as proxy.js L90-99 builds it: node_ring[id] = 100, then
 * new hashring(node_ring, 'md5', {'max cache size': cacheSize || 10000, 'replicas': 0}).
 * Keys are looked up with ring.get(key), as on proxy.js L143.
 *
 * options (all optional):
 *   cacheSize: proxy.js config.cacheSize (default 10000)
 *   ops:       [["remove", id] | ["add", id], ...] applied in order before the lookups, as
 *              proxy.js's health checks do: ring.remove(id) (L250), ring.add({id: 100}) (L235)
 *   packets:   base64 UDP payloads. Each is split into lines and keyed exactly as proxy.js
 *              L110-137 does, and those keys are looked up too.
 *   vnodeCount, weights: hashring's 'vnode count' and per-node weights. proxy.js never
 *              changes them; they are here only to test the Python class's knobs.
 *
 * hashring is loaded from the node_modules directory next to this script, whatever the cwd,
 * and must be the 3.2.0 that statsd 0.9.0 pins.
 */
'use strict';

const path = require('path');

// The exact version statsd 0.9.0 declares (package.json optionalDependencies).
const EXPECTED_VERSION = '3.2.0';
const REINSTALL =
  'npm ci --no-audit --no-fund --omit=optional --ignore-scripts --prefix tests/node';
const modulePath = path.join(__dirname, 'node_modules', 'hashring');
let Hashring;
try {
  Hashring = require(modulePath);
} catch (err) {
  process.stderr.write(
    'hashring_oracle: cannot load ' + modulePath + ': ' + err.message + '\nrun: ' + REINSTALL + '\n');
  process.exit(2);
}
if (Hashring.version !== EXPECTED_VERSION) {
  process.stderr.write(
    'hashring_oracle: ' + modulePath + ' is ' + Hashring.version + ', statsd 0.9.0 uses ' +
    EXPECTED_VERSION + '\nrun: ' + REINSTALL + '\n');
  process.exit(2);
}

// proxy.js L110-137: the key of every metric a packet carries.
function packetKeys(msg) {
  const keys = [];
  const packetData = msg.toString();
  if (packetData.indexOf('\n') > -1) {
    for (const currentMetric of packetData.split('\n')) {
      const key = currentMetric.split(':').shift();
      if (currentMetric !== '') keys.push(key);
    }
  } else {
    const key = packetData.split(':').shift();
    if (packetData !== '') keys.push(key);
  }
  return keys;
}

function main(input) {
  const request = JSON.parse(input);
  const options = request.options || {};
  const weights = options.weights || {};

  const nodeRing = {};
  for (const id of request.nodes) {
    nodeRing[id] = id in weights ? weights[id] : 100;
  }
  const ringOptions = { 'max cache size': options.cacheSize || 10000, replicas: 0 };
  if (options.vnodeCount !== undefined) ringOptions['vnode count'] = options.vnodeCount;
  const ring = new Hashring(nodeRing, 'md5', ringOptions);

  for (const [op, id] of options.ops || []) {
    if (op === 'remove') {
      ring.remove(id);
    } else if (op === 'add') {
      const server = {};
      server[id] = 100;
      ring.add(server);
    } else {
      throw new Error('unknown op ' + op);
    }
  }

  const keys = request.keys.slice();
  for (const packet of options.packets || []) {
    keys.push(...packetKeys(Buffer.from(packet, 'base64')));
  }

  const placement = Object.create(null);
  for (const key of keys) {
    const node = ring.get(key);
    placement[key] = node === undefined ? null : node;
  }
  process.stdout.write(JSON.stringify(placement));
}

const chunks = [];
process.stdin.on('data', (chunk) => chunks.push(chunk));
process.stdin.on('end', () => main(Buffer.concat(chunks).toString('utf8')));
