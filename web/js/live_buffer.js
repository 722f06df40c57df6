// Timing logic of the Reward Forcing live player, kept free of the DOM and of ComfyUI so that
// node's own test runner can check it (tests/js). Times are milliseconds (performance.now()).

/**
 * Plays frames that arrive in bursts (a chunk of 12 at a time) at a steady frame rate.
 *
 * - Playback starts (and restarts after running dry) once `prebuffer` frames are queued, or at
 *   once when the stream has ended, so a late chunk shows as a pause rather than a stutter.
 * - Frames are due on a clock: at `fps`, frame k after a (re)start is due at start + k / fps. A
 *   late tick (busy or hidden tab) skips to the newest due frame instead of playing in slow motion.
 * - The queue never holds more than `maxFrames`: the oldest frames go first, which bounds the
 *   delay between generation and display (what a prompt switch waits for).
 * - Frames older than what was already queued (a repeated or reordered chunk) are ignored.
 * - With `cutOnNewPrompt` (default), frames of a newer prompt version replace the queued frames of
 *   older ones and show at the next tick: a prompt switch appears as soon as its first chunk
 *   arrives instead of after the buffered video of the old prompt.
 * Frames that are skipped, dropped or cut are handed to `discard` (e.g. to close an ImageBitmap).
 */
export class JitterBuffer {
  constructor({ fps = 16, prebuffer = 3, maxFrames = 48, cutOnNewPrompt = true, discard = () => {} } = {}) {
    if (!(fps > 0)) throw new Error(`fps must be positive, got ${fps}`);
    this.fps = fps;
    this.cutOnNewPrompt = cutOnNewPrompt;
    this.prebuffer = Math.max(1, prebuffer);
    this.maxFrames = Math.max(this.prebuffer, maxFrames);
    this.discard = discard;
    this.reset();
  }

  reset() {
    for (const frame of this.queue ?? []) this.discard(frame);
    this.queue = [];
    this.state = "idle"; // idle -> buffering -> playing (-> buffering on a dry run)
    this.ended = false;
    this.lastIndex = -1; // run index of the newest queued frame
    this.clockStart = 0;
    this.played = 0; // frames taken since clockStart
    this.shown = 0;
    this.skipped = 0;
    this.dropped = 0;
    this.cut = 0; // frames of an old prompt replaced by a newer one's
    this.restart = false; // a cut happened: the next tick shows the new prompt's first frame
    this.underruns = 0;
  }

  get size() {
    return this.queue.length;
  }

  /** Queue frames `{ index, ... }` in run order. */
  push(frames) {
    for (const frame of frames) {
      if (frame.index <= this.lastIndex) {
        this.discard(frame);
        continue;
      }
      if (this.cutOnNewPrompt && this.queue.length && frame.promptVersion > this.queue.at(-1).promptVersion) {
        for (const old of this.queue) this.discard(old);
        this.cut += this.queue.length;
        this.queue = [];
        this.restart = true;
      }
      this.queue.push(frame);
      this.lastIndex = frame.index;
    }
    while (this.queue.length > this.maxFrames) {
      this.discard(this.queue.shift());
      this.dropped += 1;
    }
    if (this.state === "idle" && this.queue.length) this.state = "buffering";
  }

  /** The stream has no more frames to come: play out what is queued without waiting. */
  end() {
    this.ended = true;
  }

  /** The frame to show at time `now` when a new one is due, else null. */
  next(now) {
    if (this.state === "buffering") {
      if (this.queue.length < (this.ended ? 1 : this.prebuffer)) return null;
      this.state = "playing";
      this.clockStart = now;
      this.played = 0;
    }
    if (this.state !== "playing") return null;
    if (this.restart) {
      this.restart = false;
      this.clockStart = now;
      this.played = 0;
    }
    const due = Math.floor(((now - this.clockStart) * this.fps) / 1000) + 1;
    let frame = null;
    while (this.played < due && this.queue.length) {
      if (frame) {
        this.discard(frame);
        this.skipped += 1;
      }
      frame = this.queue.shift();
      this.played += 1;
    }
    if (this.played < due && !this.queue.length) {
      // ran dry: wait for the next chunk (or stop at the end of the stream)
      this.state = this.ended ? "idle" : "buffering";
      if (!this.ended) this.underruns += 1;
    }
    if (frame) this.shown += 1;
    return frame;
  }

  /** Milliseconds of video waiting in the queue. */
  bufferedMs() {
    return (this.queue.length * 1000) / this.fps;
  }
}

/** Events per second over a sliding window (e.g. frames shown, frames received). */
export class RateMeter {
  constructor(windowMs = 2000) {
    this.windowMs = windowMs;
    this.events = []; // [time, count]
    this.start = null; // time of the first event: until a full window has passed, divide by less
  }

  add(now, count = 1) {
    if (this.start === null) this.start = now;
    this.events.push([now, count]);
    this.trim(now);
  }

  trim(now) {
    while (this.events.length && this.events[0][0] <= now - this.windowMs) this.events.shift();
  }

  rate(now) {
    this.trim(now);
    if (!this.events.length) return 0;
    const total = this.events.reduce((sum, [, n]) => sum + n, 0);
    // a quarter window at least, so the first burst does not read as a huge rate
    const span = Math.max(Math.min(this.windowMs, now - this.start), this.windowMs / 4);
    return (total * 1000) / span;
  }
}

/** Delay from a prompt switch request (Enter) to the first shown frame generated under it. */
export class SwitchLatency {
  constructor() {
    this.pending = null; // { version, at } of the newest request not shown yet
    this.last = null; // ms
  }

  /** The server accepted the request and answered with the prompt version it will carry. */
  requested(version, at) {
    this.pending = { version, at };
  }

  /** A frame of `promptVersion` is shown at `now`; returns the latency when it completes a switch. */
  shown(promptVersion, now) {
    if (!this.pending || promptVersion < this.pending.version) return null;
    this.last = now - this.pending.at;
    this.pending = null;
    return this.last;
  }
}

/** Decodes base64 into bytes (the chunk event carries JPEG frames as base64 strings). */
export function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i += 1) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

/** Frames `{ index, promptVersion, data }` of a chunk event, in run order. */
export function chunkFrames(detail) {
  return detail.frames.map((data, i) => ({
    index: detail.first_frame + i,
    promptVersion: detail.prompt_version,
    chunk: detail.index,
    data,
  }));
}
