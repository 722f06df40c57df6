// Reward Forcing live player: a widget on the "Reward Forcing: Live" node that plays the stream's
// chunks as they arrive, with a prompt box (Enter = switch), Pause/Resume, Stop and a link to the
// recording. The server side is nodes/live*.py; the timing logic lives in live_buffer.js.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { JitterBuffer, RateMeter, SwitchLatency, base64ToBytes, chunkFrames } from "./live_buffer.js";

const NODE_CLASS = "RewardForcingLive";
const ROUTE = "/reward_forcing/live";
const EVENTS = {
  chunk: "rewardforcing.live.chunk",
  state: "rewardforcing.live.state",
  error: "rewardforcing.live.error",
};
const CONTROLS_HEIGHT = 96; // stats line + prompt row + link row, in px
const STATS_EVERY_MS = 250;

function el(tag, style = {}, props = {}) {
  const node = document.createElement(tag);
  Object.assign(node.style, style);
  Object.assign(node, props);
  return node;
}

async function post(action, body) {
  let response;
  try {
    response = await api.fetchApi(`${ROUTE}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  } catch (err) {
    return { ok: false, body: { error: `server unreachable: ${err}` } };
  }
  let json = {};
  try {
    json = await response.json();
  } catch {
    json = { error: `HTTP ${response.status} (no JSON answer: is the Reward Forcing pack loaded?)` };
  }
  return { ok: response.ok, body: json };
}

class LivePlayer {
  constructor(node) {
    this.node = node;
    this.session = null;
    this.state = "idle";
    this.chunks = 0;
    this.width = 832;
    this.height = 480;
    this.current = null; // ImageBitmap on the canvas
    this.decoding = Promise.resolve();
    this.raf = null;
    this.lastStats = 0;
    this.message = "";
    this.buffer = new JitterBuffer({ fps: 16, prebuffer: 3, maxFrames: 48, discard: (f) => f.bitmap?.close?.() });
    this.shownRate = new RateMeter(2000);
    this.arrivalRate = new RateMeter(4000);
    this.switchLatency = new SwitchLatency();
    this.build();
    this.render();
  }

  build() {
    this.root = el("div", { display: "flex", flexDirection: "column", gap: "4px", width: "100%" });
    this.root.className = "rf-live-player";
    const screen = el("div", { position: "relative", width: "100%", background: "#000", borderRadius: "4px" });
    this.canvas = el("canvas", { width: "100%", display: "block", borderRadius: "4px" });
    this.canvas.width = this.width;
    this.canvas.height = this.height;
    this.canvas.style.aspectRatio = `${this.width} / ${this.height}`;
    this.overlay = el("div", {
      position: "absolute", inset: "0", display: "flex", alignItems: "center", justifyContent: "center",
      color: "#aaa", font: "13px sans-serif", textAlign: "center", padding: "8px", pointerEvents: "none",
    });
    screen.append(this.canvas, this.overlay);
    this.stats = el("div", { font: "11px monospace", color: "#ccc", whiteSpace: "nowrap", overflow: "hidden" });
    const row = el("div", { display: "flex", gap: "4px" });
    this.prompt = el(
      "input",
      { flex: "1", minWidth: "0", font: "12px sans-serif", padding: "3px 6px" },
      { type: "text", placeholder: "New prompt, Enter to switch", maxLength: 2000 },
    );
    this.prompt.className = "rf-live-prompt";
    this.pauseButton = el("button", { font: "12px sans-serif" }, { textContent: "Pause" });
    this.pauseButton.className = "rf-live-pause";
    this.stopButton = el("button", { font: "12px sans-serif" }, { textContent: "Stop" });
    this.stopButton.className = "rf-live-stop";
    row.append(this.prompt, this.pauseButton, this.stopButton);
    this.link = el("a", { font: "12px sans-serif", color: "#8cf" }, { target: "_blank", textContent: "" });
    this.link.className = "rf-live-recording";
    this.root.append(screen, this.stats, row, this.link);

    // Keys typed in the prompt box are ours, not the graph canvas's shortcuts.
    for (const type of ["keydown", "keyup", "keypress"]) {
      this.prompt.addEventListener(type, (e) => e.stopPropagation());
    }
    this.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        this.sendPrompt();
      }
    });
    this.pauseButton.addEventListener("click", () => this.togglePause());
    this.stopButton.addEventListener("click", () => this.stop());
  }

  live() {
    return this.session !== null && (this.state === "running" || this.state === "paused");
  }

  // ---------------------------------------------------------------- server events
  adopt(session) {
    if (session === this.session) return;
    this.session = session;
    this.chunks = 0;
    this.message = "";
    this.buffer.reset();
    this.switchLatency = new SwitchLatency();
    this.link.textContent = "";
    this.link.removeAttribute("href");
  }

  onState(detail) {
    if (!detail?.session) return;
    this.adopt(detail.session);
    this.state = detail.state;
    if (detail.fps) this.buffer.fps = detail.fps;
    if (detail.state === "finished") {
      this.buffer.end();
      this.showRecording(detail.recording);
      if (detail.stopped_by === "cancel") this.message = "cancelled";
    }
    if (detail.error) this.message = detail.error;
    this.render();
    this.startLoop();
  }

  onError(detail) {
    this.message = detail.message;
    this.render();
  }

  onChunk(detail) {
    this.adopt(detail.session);
    if (this.state === "idle" || this.state === "finished") this.state = "running";
    this.chunks = Math.max(this.chunks, detail.index + 1);
    if (detail.fps) this.buffer.fps = detail.fps;
    if (detail.width !== this.width || detail.height !== this.height) this.resize(detail.width, detail.height);
    const now = performance.now();
    this.arrivalRate.add(now, detail.frames.length);
    const frames = chunkFrames(detail);
    const mime = detail.mime || "image/jpeg";
    // Decode in parallel but queue chunks in arrival order.
    const decoded = Promise.all(
      frames.map(async (f) => ({
        index: f.index,
        promptVersion: f.promptVersion,
        bitmap: await createImageBitmap(new Blob([base64ToBytes(f.data)], { type: mime })),
      })),
    );
    this.decoding = this.decoding
      .then(() => decoded)
      .then((ready) => {
        if (detail.session !== this.session) {
          for (const f of ready) f.bitmap.close();
          return;
        }
        this.buffer.push(ready);
        this.startLoop();
      })
      .catch((err) => {
        this.message = `could not show chunk ${detail.index}: ${err}`;
      });
  }

  onExecuted(output) {
    this.showRecording(output?.rf_live_recording?.[0]);
  }

  fitNode() {
    const min = this.node.computeSize?.();
    if (min && this.node.size[1] < min[1]) this.node.setSize([this.node.size[0], min[1]]);
    this.node.setDirtyCanvas?.(true, true);
  }

  showRecording(entry) {
    if (!entry?.filename) return;
    const query = new URLSearchParams({ filename: entry.filename, subfolder: entry.subfolder ?? "", type: entry.type ?? "output" });
    this.link.href = api.apiURL(`/view?${query}`);
    this.link.textContent = `recording: ${entry.filename}`;
  }

  async reconnect() {
    // After a page reload the stream may still run: find it by this node's id.
    const response = await api.fetchApi(`${ROUTE}/status`).catch(() => null);
    if (!response?.ok) return;
    const { sessions = [] } = await response.json();
    const mine = sessions.find((s) => String(s.node) === String(this.node.id));
    if (mine) this.onState(mine);
  }

  // ---------------------------------------------------------------- controls
  async sendPrompt() {
    const text = this.prompt.value.trim();
    if (!text) return;
    if (!this.live()) {
      this.message = "no live stream: queue the workflow first";
      this.render();
      return;
    }
    const at = performance.now();
    const { ok, body } = await post("prompt", { session: this.session, text });
    if (ok) {
      this.switchLatency.requested(body.prompt_version, at);
      this.message = `switching to prompt ${body.prompt_version}…`;
    } else {
      this.message = body.error;
    }
    this.render();
  }

  async togglePause() {
    if (!this.live()) return;
    const { ok, body } = await post(this.state === "paused" ? "resume" : "pause", { session: this.session });
    if (ok) this.state = body.state;
    else this.message = body.error;
    this.render();
  }

  async stop() {
    if (!this.live()) return;
    const { ok, body } = await post("stop", { session: this.session });
    if (ok) this.state = body.state;
    else this.message = body.error;
    this.render();
  }

  // ---------------------------------------------------------------- drawing
  resize(width, height) {
    this.width = width;
    this.height = height;
    this.canvas.width = width;
    this.canvas.height = height;
    this.canvas.style.aspectRatio = `${width} / ${height}`;
    this.fitNode();
  }

  minHeight() {
    const width = Math.max(64, (this.node.size?.[0] ?? 400) - 20);
    return Math.round((width * this.height) / this.width) + CONTROLS_HEIGHT;
  }

  startLoop() {
    if (this.raf === null) this.raf = requestAnimationFrame((t) => this.tick(t));
  }

  tick(now) {
    this.raf = null;
    const frame = this.buffer.next(now);
    if (frame) {
      this.canvas.getContext("2d").drawImage(frame.bitmap, 0, 0, this.width, this.height);
      this.current?.close();
      this.current = frame.bitmap;
      this.shownRate.add(now);
      this.root.dataset.framesShown = String(this.buffer.shown);
      this.root.dataset.lastPromptVersion = String(frame.promptVersion);
      if (this.switchLatency.shown(frame.promptVersion, now) !== null) {
        this.message = "";
        this.root.dataset.switchLatencyMs = String(Math.round(this.switchLatency.last));
        this.lastStats = 0; // show the new latency right away
      }
    }
    if (now - this.lastStats > STATS_EVERY_MS) {
      this.lastStats = now;
      this.render(now);
    }
    if (this.live() || this.buffer.size || this.buffer.state === "playing") this.startLoop();
    else this.render(now);
  }

  render(now = performance.now()) {
    const parts = [this.state];
    if (this.session) {
      parts.push(`${this.shownRate.rate(now).toFixed(1)} fps`);
      parts.push(`chunk ${this.chunks}`);
      parts.push(`buffer ${Math.round(this.buffer.bufferedMs())} ms`);
      const latency = this.switchLatency.last;
      parts.push(`switch ${latency === null ? "–" : `${(latency / 1000).toFixed(2)} s`}`);
    }
    this.stats.textContent = parts.join(" · ") + (this.message ? ` · ${this.message}` : "");
    this.stats.title = `received ${this.arrivalRate.rate(now).toFixed(1)} fps, shown ${this.buffer.shown}, ` +
      `skipped ${this.buffer.skipped}, dropped ${this.buffer.dropped}, underruns ${this.buffer.underruns}`;
    this.overlay.textContent = this.session ? "" : "Queue the workflow to start the live stream";
    this.overlay.style.display = this.session && this.current ? "none" : "flex";
    const live = this.live();
    this.prompt.disabled = !live;
    this.pauseButton.disabled = !live;
    this.stopButton.disabled = !live;
    this.pauseButton.textContent = this.state === "paused" ? "Resume" : "Pause";
    Object.assign(this.root.dataset, { state: this.state, chunks: String(this.chunks), session: this.session ?? "" });
  }

  dispose() {
    if (this.raf !== null) cancelAnimationFrame(this.raf);
    this.raf = null;
    this.buffer.reset();
    this.current?.close();
    this.current = null;
    this.session = null;
  }
}

function attachPlayer(node) {
  if (node.rfLivePlayer || typeof node.addDOMWidget !== "function") return;
  const player = new LivePlayer(node);
  const widget = node.addDOMWidget("rf_live_player", "rf_live_player", player.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => player.minHeight(),
  });
  widget.serialize = false; // keep it out of widgets_values (saved workflows stay loadable without us)
  node.rfLivePlayer = player;
  const min = node.computeSize?.();
  if (min) node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], min[1])]);
}

function playerForNode(nodeId) {
  if (nodeId === null || nodeId === undefined) return null;
  const graph = app.graph;
  const id = String(nodeId);
  // Nodes inside subgraphs report "parent:child" execution ids.
  const node = graph?.getNodeById?.(id) ?? graph?.getNodeById?.(Number(id.split(":").pop()));
  return node?.rfLivePlayer ?? null;
}

function playerForSession(session) {
  for (const node of app.graph?._nodes ?? []) {
    if (node.rfLivePlayer?.session === session) return node.rfLivePlayer;
  }
  return null;
}

app.registerExtension({
  name: "rewardforcing.live",

  setup() {
    // Registering the listeners also tells the frontend these event types are wanted.
    api.addEventListener(EVENTS.chunk, ({ detail }) => {
      (playerForSession(detail.session) ?? playerForNode(detail.node))?.onChunk(detail);
    });
    api.addEventListener(EVENTS.state, ({ detail }) => {
      (playerForSession(detail.session) ?? playerForNode(detail.node))?.onState(detail);
    });
    api.addEventListener(EVENTS.error, ({ detail }) => playerForSession(detail.session)?.onError(detail));
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS) return;
    const created = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = created?.apply(this, args);
      attachPlayer(this);
      return result;
    };
    const removed = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function (...args) {
      this.rfLivePlayer?.dispose();
      return removed?.apply(this, args);
    };
    const executed = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      executed?.apply(this, [output]);
      this.rfLivePlayer?.onExecuted(output);
    };
  },

  loadedGraphNode(node) {
    node.rfLivePlayer?.reconnect();
  },
});
