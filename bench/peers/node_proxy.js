// The shape of most simple StatsD filtering proxies: one datagram in, one out.
//
//     node node_proxy.js TARGET_PORT [BLOCKED_TEXT]   (prints "port N" once listening)
//
// Listens on 127.0.0.1 (any free port). A datagram whose text contains
// BLOCKED_TEXT (default "blocked") anywhere is dropped whole; every other one is
// sent on unchanged to 127.0.0.1:TARGET_PORT. No parsing, no batching: what
// Node's event loop costs per datagram is the point of the comparison.
"use strict";
const dgram = require("node:dgram");

const target = Number(process.argv[2]);
const needle = Buffer.from(process.argv[3] || "blocked");
const inbound = dgram.createSocket({ type: "udp4", recvBufferSize: 4 << 20 });
const outbound = dgram.createSocket("udp4");

outbound.connect(target, "127.0.0.1", () => {
  inbound.on("message", (msg) => {
    if (msg.includes(needle)) return;
    outbound.send(msg);
  });
  inbound.bind(0, "127.0.0.1", () => {
    process.stdout.write(`port ${inbound.address().port}\n`);
  });
});
outbound.on("error", () => {}); // upstream gone: drop, as UDP would
process.on("SIGTERM", () => process.exit(0));
