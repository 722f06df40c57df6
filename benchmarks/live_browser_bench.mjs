// Browser-side cost of the two live-frame transports, in headless Chromium (see live_transport_bench.py).
//
//   python benchmarks/live_transport_bench.py --chunks 2 --dump /tmp/chunk.json
//   RF_PLAYWRIGHT_DIR=... node benchmarks/live_browser_bench.mjs /tmp/chunk.json
//
// binary: what the page does per ComfyUI binary preview: a Blob from the message bytes, the core's own
//   object URL for the node preview (created and revoked), and our ImageBitmap decode.
// event: JSON.parse of the chunk message, base64 -> bytes, Blob, ImageBitmap decode.
// Prints medians over repeats: main-thread (synchronous) ms per frame and wall ms per 12-frame chunk.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const dir = process.env.RF_PLAYWRIGHT_DIR;
const pw = createRequire(dir ? `${dir.replace(/\/$/, "")}/` : import.meta.url)("playwright-core");
const data = JSON.parse(readFileSync(process.argv[2], "utf8"));
const browser = await pw.chromium.launch({
  executablePath: process.env.RF_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
});
const page = await browser.newPage();
const result = await page.evaluate(async ({ event_text, binary_jpegs }) => {
  const toBytes = (b64) => {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i += 1) out[i] = s.charCodeAt(i);
    return out;
  };
  const messages = binary_jpegs.map((b) => toBytes(b).buffer); // as the WebSocket hands them over
  const median = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const runs = { binary: [], event: [] };
  for (let r = 0; r < 15; r += 1) {
    for (const mode of ["binary", "event"]) {
      const t0 = performance.now();
      let sync = 0;
      let pending;
      if (mode === "binary") {
        pending = messages.map((buf) => {
          const s0 = performance.now();
          const blob = new Blob([buf.slice(0)], { type: "image/jpeg" });
          URL.revokeObjectURL(URL.createObjectURL(blob));
          sync += performance.now() - s0;
          return createImageBitmap(blob);
        });
      } else {
        const s0 = performance.now();
        const detail = JSON.parse(event_text).data;
        const blobs = detail.frames.map((b) => new Blob([toBytes(b)], { type: "image/jpeg" }));
        sync += performance.now() - s0;
        pending = blobs.map((blob) => createImageBitmap(blob));
      }
      const bitmaps = await Promise.all(pending);
      bitmaps.forEach((b) => b.close());
      if (r >= 3) runs[mode].push([sync / bitmaps.length, performance.now() - t0]);
    }
  }
  const out = {};
  for (const [mode, xs] of Object.entries(runs)) {
    out[mode] = {
      main_thread_ms_per_frame: +median(xs.map((x) => x[0])).toFixed(3),
      wall_ms_per_chunk: +median(xs.map((x) => x[1])).toFixed(1),
    };
  }
  out.frames_per_chunk = binary_jpegs.length;
  out.event_kib = +(event_text.length / 1024).toFixed(1);
  return out;
}, data);
console.log(JSON.stringify({ chromium: browser.version(), ...result }, null, 2));
await browser.close();
