// Player timing logic: run with `node --test tests/js/` (Node >= 18, no dependencies).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  JitterBuffer,
  RateMeter,
  SwitchLatency,
  base64ToBytes,
  chunkFrames,
} from "../../web/js/live_buffer.js";

const frames = (first, n, promptVersion = 0) =>
  Array.from({ length: n }, (_, i) => ({ index: first + i, promptVersion }));

test("waits for the prebuffer, then plays one frame per 1/fps", () => {
  const b = new JitterBuffer({ fps: 16, prebuffer: 3 });
  assert.equal(b.next(0), null);
  b.push(frames(0, 2));
  assert.equal(b.state, "buffering");
  assert.equal(b.next(10), null, "2 < prebuffer of 3");
  b.push(frames(2, 10));
  const shown = [];
  // ticks at 60 Hz for one second from t = 100
  for (let t = 100; t < 1100; t += 1000 / 60) {
    const f = b.next(t);
    if (f) shown.push([f.index, t]);
  }
  assert.deepEqual(
    shown.map(([i]) => i),
    [...Array(12).keys()],
  );
  // frame k is shown at the first tick at or after 100 + k * 62.5 ms, never earlier
  for (const [k, t] of shown) {
    assert.ok(t >= 100 + k * 62.5 - 1e-9, `frame ${k} at ${t}`);
    assert.ok(t < 100 + k * 62.5 + 1000 / 60, `frame ${k} late at ${t}`);
  }
  assert.equal(b.skipped, 0);
});

test("a dry run is an underrun: it pauses and restarts the clock when the next chunk arrives", () => {
  const b = new JitterBuffer({ fps: 10, prebuffer: 2 });
  b.push(frames(0, 2));
  assert.equal(b.next(0).index, 0);
  assert.equal(b.next(100).index, 1);
  assert.equal(b.next(200), null);
  assert.equal(b.state, "buffering");
  assert.equal(b.underruns, 1);
  assert.equal(b.next(5000), null, "nothing queued");
  b.push(frames(2, 12));
  // playback restarts at the first tick after the chunk, not "catching up" the gap
  assert.equal(b.next(6000).index, 2);
  assert.equal(b.next(6050), null, "next frame is due at 6100");
  assert.equal(b.next(6100).index, 3);
  assert.equal(b.skipped, 0);
});

test("a late tick skips to the newest due frame and discards the skipped ones", () => {
  const discarded = [];
  const b = new JitterBuffer({ fps: 10, prebuffer: 1, discard: (f) => discarded.push(f.index) });
  b.push(frames(0, 10));
  assert.equal(b.next(0).index, 0);
  assert.equal(b.next(350).index, 3, "frames 1, 2 and 3 were due by 350 ms");
  assert.deepEqual(discarded, [1, 2]);
  assert.equal(b.skipped, 2);
  assert.equal(b.shown, 2);
});

test("the queue is bounded: the oldest frames are dropped", () => {
  const discarded = [];
  const b = new JitterBuffer({ fps: 16, prebuffer: 3, maxFrames: 24, discard: (f) => discarded.push(f.index) });
  b.push(frames(0, 12));
  b.push(frames(12, 12));
  b.push(frames(24, 12));
  assert.equal(b.size, 24);
  assert.equal(b.dropped, 12);
  assert.deepEqual(discarded, [...Array(12).keys()]);
  assert.equal(b.next(0).index, 12);
  assert.equal(b.bufferedMs(), (23 * 1000) / 16);
});

test("repeated or reordered frames are ignored", () => {
  const b = new JitterBuffer({ prebuffer: 1 });
  b.push(frames(0, 12));
  b.push(frames(6, 12)); // overlaps 6..11
  assert.equal(b.size, 18);
  b.push(frames(3, 2)); // entirely old
  assert.equal(b.size, 18);
  assert.equal(b.lastIndex, 17);
});

test("after the end the rest plays without the prebuffer, then the player goes idle", () => {
  const b = new JitterBuffer({ fps: 10, prebuffer: 5 });
  b.push(frames(0, 2));
  assert.equal(b.next(0), null);
  b.end();
  assert.equal(b.next(10).index, 0);
  assert.equal(b.next(110).index, 1);
  assert.equal(b.next(210), null);
  assert.equal(b.state, "idle");
  assert.equal(b.underruns, 0);
});

test("reset discards everything queued", () => {
  const discarded = [];
  const b = new JitterBuffer({ discard: (f) => discarded.push(f.index) });
  b.push(frames(0, 4));
  b.reset();
  assert.deepEqual(discarded, [0, 1, 2, 3]);
  assert.equal(b.state, "idle");
  b.push(frames(0, 1)); // a new stream starts again at 0
  assert.equal(b.size, 1);
});

test("rate meter counts events over its window", () => {
  const m = new RateMeter(1000);
  assert.equal(m.rate(0), 0);
  for (let t = 0; t <= 3000; t += 62.5) m.add(t);
  assert.ok(Math.abs(m.rate(3000) - 16) < 0.5, `got ${m.rate(3000)}`);
  m.add(3000, 12);
  assert.ok(m.rate(3000) > 16);
  assert.equal(m.rate(10000), 0);
});

test("switch latency runs from the request to the first shown frame of that prompt version", () => {
  const s = new SwitchLatency();
  assert.equal(s.shown(0, 50), null);
  s.requested(2, 1000);
  assert.equal(s.shown(1, 1500), null, "older prompt still playing");
  assert.equal(s.shown(2, 1800), 800);
  assert.equal(s.shown(2, 1900), null, "counted once");
  assert.equal(s.last, 800);
});

test("chunk events become indexed frames and base64 decodes to bytes", () => {
  const detail = { index: 3, first_frame: 33, prompt_version: 2, frames: ["AAEC", "/w=="] };
  const got = chunkFrames(detail);
  assert.deepEqual(
    got.map((f) => [f.index, f.promptVersion, f.chunk]),
    [
      [33, 2, 3],
      [34, 2, 3],
    ],
  );
  assert.deepEqual([...base64ToBytes(got[0].data)], [0, 1, 2]);
  assert.deepEqual([...base64ToBytes(got[1].data)], [255]);
});

test("frames of a newer prompt replace the queued old ones and show at the next tick", () => {
  const cut = [];
  const b = new JitterBuffer({ fps: 16, prebuffer: 3, maxFrames: 48, discard: (f) => cut.push(f.index) });
  b.push(frames(0, 24, 0));
  assert.equal(b.next(0).index, 0);
  assert.equal(b.next(70).index, 1);
  b.push(frames(24, 12, 1)); // the first chunk under prompt 1 arrives with 22 old frames queued
  assert.equal(b.size, 12);
  assert.deepEqual(cut, [...Array(22).keys()].map((i) => i + 2));
  assert.equal(b.cut, 22);
  const latency = new SwitchLatency();
  latency.requested(1, 50);
  const shown = b.next(80); // 10 ms later: at once, not when frame 24 would have been due
  assert.equal(shown.index, 24);
  assert.equal(latency.shown(shown.promptVersion, 80), 30);
  assert.equal(b.next(100), null, "then the clock restarts: the next frame 1/fps later");
  assert.equal(b.next(80 + 62.5).index, 25);
});

test("without cutOnNewPrompt a switch waits for the queued frames", () => {
  const b = new JitterBuffer({ fps: 16, prebuffer: 3, cutOnNewPrompt: false });
  b.push(frames(0, 24, 0));
  b.next(0);
  b.push(frames(24, 12, 1));
  assert.equal(b.size, 35);
  assert.equal(b.next(70).promptVersion, 0);
});
