#!/usr/bin/env node
// node-jsonl: subscribe to plant telemetry over MQTT and store it as JSON lines.
//
//   node pipeline.js --broker mqtt://HOST:PORT --topic 'plant/+/telemetry' --out DIR
//
// This is deliberately the small pipeline a Node.js developer would write in an
// afternoon, kept as an *external* system for iiot-bench to measure. It works on
// the happy path. Its weaknesses are left in on purpose; the bench's job is to
// find and count them:
//
//   - Clean session (clean: true): the broker forgets the subscription whenever
//     the connection drops, so messages published while the pipeline is down or
//     reconnecting are lost, and QoS 1 messages it had received but not yet
//     acknowledged are not redelivered.
//   - Acknowledged before stored: mqtt.js sends the PUBACK as soon as the
//     'message' handler returns, i.e. before the line reaches the disk.
//   - Buffered writes: every readings file has one fs.createWriteStream (flags
//     'a') that is kept open; lines sit in Node's stream buffer until it flushes,
//     and nothing is ever fsync'ed. kill -9 loses what is still buffered, and a
//     crash or power loss can leave a half-written last line.
//   - Duplicates are stored twice: there is no de-duplication by seq (a QoS 1
//     redelivery, or a sensor that repeats itself, gives two lines).
//   - No backpressure: stream.write()'s return value is ignored, so a burst
//     faster than the disk grows the process's memory without bound (and the
//     broker's own queue for this client may overflow and drop messages).
//   - progress.json is overwritten in place every second (not written to a temp
//     file and renamed): a reader, or a crash, can catch it empty or truncated.
//   - Streams for past minutes are never closed: one open file descriptor per
//     minute of data, forever.
//   - Timestamps are parsed with new Date(): a ts without a zone is taken as the
//     machine's local time, sub-millisecond digits are ignored for the file name.

'use strict';

const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');
const mqtt = require('mqtt');

const { values: args } = parseArgs({
  options: {
    broker: { type: 'string', default: 'mqtt://127.0.0.1:1883' },
    topic: { type: 'string', default: 'plant/+/telemetry' },
    out: { type: 'string', default: './out' },
  },
});

const outDir = path.resolve(args.out);
fs.mkdirSync(outDir, { recursive: true });

const counts = { received: 0, accepted: 0, rejected: 0 };
const streams = new Map(); // file name -> fs.WriteStream, kept open

function streamFor(name) {
  let stream = streams.get(name);
  if (!stream) {
    stream = fs.createWriteStream(path.join(outDir, name), { flags: 'a' });
    stream.on('error', (err) => console.error(`node-pipeline: write error on ${name}: ${err.message}`));
    streams.set(name, stream);
  }
  return stream;
}

// 2026-01-01T00:00:00.123Z -> 20260101T0000
function minuteOf(date) {
  return date.toISOString().slice(0, 16).replace(/[-:]/g, '');
}

// msg: the parsed payload, when it parsed. Its seq is kept at the top level of the line, so that whoever reads
// the rejects back can tell which message each one was; a payload that is not JSON has none to keep.
function reject(reason, raw, receivedAt, msg) {
  counts.rejected++;
  const line = { reason, payload: raw, received_at: receivedAt };
  if (msg && Number.isSafeInteger(msg.seq)) line.seq = msg.seq;
  streamFor('rejected.jsonl').write(JSON.stringify(line) + '\n');
}

function handle(topic, payload) {
  counts.received++;
  const receivedAt = new Date().toISOString();
  const raw = payload.toString('utf8');

  let msg;
  try {
    msg = JSON.parse(raw);
  } catch (err) {
    return reject('invalid_json', raw, receivedAt);
  }
  if (!msg || !msg.machine || !msg.ts) {
    return reject('missing_field', raw, receivedAt, msg);
  }
  const ts = new Date(msg.ts);
  if (Number.isNaN(ts.getTime())) {
    return reject('bad_timestamp', raw, receivedAt, msg);
  }
  if (!Number.isFinite(msg.load_rate)) {
    return reject('bad_value', raw, receivedAt, msg);
  }

  counts.accepted++;
  // write() returns false when the buffer is over its high-water mark; we carry on regardless.
  streamFor(`readings-${minuteOf(ts)}.jsonl`).write(JSON.stringify({ ...msg, received_at: receivedAt }) + '\n');
}

function writeProgress() {
  const body = JSON.stringify({ ...counts, updated_at: new Date().toISOString() });
  fs.writeFile(path.join(outDir, 'progress.json'), body, (err) => {
    if (err) console.error(`node-pipeline: progress.json: ${err.message}`);
  });
}
const progressTimer = setInterval(writeProgress, 1000);

const client = mqtt.connect(args.broker, { clean: true, reconnectPeriod: 1000 });
let announced = false;

client.on('connect', () => {
  client.subscribe(args.topic, { qos: 1 }, (err, granted) => {
    if (err || !granted || granted.some((g) => g.qos === 128)) {
      console.error(`node-pipeline: subscribe to ${args.topic} refused: ${err ? err.message : JSON.stringify(granted)}`);
      process.exit(1);
    }
    if (!announced) {
      announced = true;
      console.log(`node-pipeline: subscribed to ${args.topic}`);
    }
  });
});
client.on('message', handle);
client.on('error', (err) => console.error(`node-pipeline: mqtt error: ${err.message}`));
client.on('reconnect', () => console.error('node-pipeline: reconnecting'));

let stopping = false;
async function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  console.error(`node-pipeline: ${signal}, closing`);
  clearInterval(progressTimer);
  // Stop receiving first, so that nothing is written to a stream after it has ended.
  await new Promise((resolve) => client.end(false, {}, resolve));
  await Promise.all(
    [...streams.values()].map((s) => new Promise((resolve) => {
      s.once('finish', resolve);
      s.once('error', resolve);
      s.end();
    })),
  );
  fs.writeFileSync(path.join(outDir, 'progress.json'), JSON.stringify({ ...counts, updated_at: new Date().toISOString() }));
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
