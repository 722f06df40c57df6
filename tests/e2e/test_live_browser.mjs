// Browser half of tests/e2e/test_live_browser.py: drives the real ComfyUI page in headless Chromium.
//
//   node tests/e2e/test_live_browser.mjs URL SHIPPED.json WORKFLOW.json SCREENSHOT.png RESULT.json
//
// Converts the shipped UI workflow to API format with the page's own graphToPrompt (the Python side
// compares it with the API twin), then loads the test variant WORKFLOW.json, queues it, waits for frames in the live player, switches the prompt from the
// player's prompt box, presses Stop, saves a screenshot and writes what it saw to RESULT.json (the
// Python side asserts on it). Needs playwright-core (resolved from here or from RF_PLAYWRIGHT_DIR) and
// Chromium at RF_CHROMIUM (default /usr/bin/chromium).
import { readFileSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";

function playwright() {
  try {
    return createRequire(import.meta.url)("playwright-core");
  } catch (err) {
    const dir = process.env.RF_PLAYWRIGHT_DIR;
    if (!dir) throw new Error(`playwright-core not found (${err.message}); set RF_PLAYWRIGHT_DIR`);
    return createRequire(`${dir.replace(/\/$/, "")}/`)("playwright-core");
  }
}

const [url, shippedPath, workflowPath, screenshotPath, resultPath] = process.argv.slice(2);
const shipped = JSON.parse(readFileSync(shippedPath, "utf8"));
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const NEW_PROMPT = "a lighthouse on a cliff in a storm at night";
const result = { steps: [], consoleErrors: [] };
const step = (name, extra = {}) => result.steps.push({ name, t: Date.now(), ...extra });

const browser = await playwright().chromium.launch({
  executablePath: process.env.RF_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
  ],
});
const player = (page, key) =>
  page.evaluate((k) => document.querySelector(".rf-live-player")?.dataset?.[k] ?? null, key);

try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1300 } });
  page.on("console", (m) => {
    if (m.type() === "error") result.consoleErrors.push(`${m.text()} @ ${m.location()?.url ?? ""}`);
  });
  page.on("pageerror", (e) => result.consoleErrors.push(String(e.stack || e)));

  await page.goto(url, { waitUntil: "domcontentloaded" });
  // Ready when our node type is registered and the app has loaded its own start-up graph (loading
  // ours earlier would race with it, and nodes would be reported missing).
  await page.waitForFunction(
    () => window.LiteGraph?.registered_node_types?.RewardForcingLive && window.comfyAPI?.app?.app?.graph?._nodes?.length,
    null,
    { timeout: 120000 },
  );
  step("page ready");

  result.shippedApi = await page.evaluate(async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf, true, false);
    return (await app.graphToPrompt()).output;
  }, shipped);

  await page.evaluate(async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf, true, false);
    const node = app.graph._nodes.find((n) => n.type === "RewardForcingLive");
    // Put the live node in the middle of the view, at a zoom where its DOM widgets show.
    app.canvas.ds.scale = 0.9;
    app.canvas.ds.offset = [440 - node.pos[0], 40 - node.pos[1]];
    app.canvas.setDirty(true, true);
  }, workflow);
  await page.waitForSelector(".rf-live-player", { timeout: 30000 });
  result.idleText = await page.evaluate(() => document.querySelector(".rf-live-player").innerText);
  step("workflow loaded");

  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  step("queued");
  await page.waitForFunction(
    () => Number(document.querySelector(".rf-live-player")?.dataset.framesShown || 0) >= 5,
    null,
    { timeout: 240000, polling: 100 },
  );
  step("frames shown", { framesShown: Number(await player(page, "framesShown")) });
  result.session = await player(page, "session");

  await page.fill(".rf-live-prompt", NEW_PROMPT);
  await page.press(".rf-live-prompt", "Enter");
  step("prompt entered");
  await page.waitForFunction(
    () => document.querySelector(".rf-live-player")?.dataset.lastPromptVersion === "1",
    null,
    { timeout: 240000, polling: 50 },
  );
  step("new prompt shown", { switchLatencyMs: Number(await player(page, "switchLatencyMs")) });
  await page.screenshot({ path: screenshotPath.replace(/\.png$/, "_running.png") });

  // The server's own account of the session, through the status route.
  result.statusWhileRunning = await page.evaluate(async (session) => {
    const r = await fetch(`/api/reward_forcing/live/status?session=${session}`);
    return { status: r.status, body: await r.json() };
  }, result.session);
  // A bad request from the page gets a JSON error.
  result.badRequest = await page.evaluate(async () => {
    const r = await fetch("/api/reward_forcing/live/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ session: "../../etc/passwd", text: "x" }),
    });
    return { status: r.status, body: await r.json() };
  });

  await page.click(".rf-live-pause");
  await page.waitForFunction(() => document.querySelector(".rf-live-player")?.dataset.state === "paused");
  result.pausedStatus = await page.evaluate(async (session) => {
    const r = await fetch(`/api/reward_forcing/live/status?session=${session}`);
    return (await r.json()).state;
  }, result.session);
  await page.click(".rf-live-pause"); // now labelled Resume
  await page.waitForFunction(() => document.querySelector(".rf-live-player")?.dataset.state === "running");
  step("paused and resumed");

  await page.click(".rf-live-stop");
  step("stop clicked");
  await page.waitForFunction(
    () => {
      const el = document.querySelector(".rf-live-player");
      return el?.dataset.state === "finished" && document.querySelector(".rf-live-recording")?.href;
    },
    null,
    { timeout: 120000, polling: 100 },
  );
  step("finished");
  await page.waitForTimeout(1500); // let the buffered frames play out before the screenshot
  result.final = await page.evaluate(() => {
    const el = document.querySelector(".rf-live-player");
    const link = document.querySelector(".rf-live-recording");
    return { ...el.dataset, text: el.innerText, recording: link.href, recordingText: link.textContent };
  });
  result.recordingFetch = await page.evaluate(async (href) => {
    const r = await fetch(href);
    const body = await r.arrayBuffer();
    return { status: r.status, type: r.headers.get("content-type"), bytes: body.byteLength };
  }, result.final.recording);
  await page.screenshot({ path: screenshotPath });
  step("screenshot");
} catch (err) {
  result.error = String(err?.stack || err);
} finally {
  writeFileSync(resultPath, JSON.stringify(result, null, 2));
  await browser.close();
}
