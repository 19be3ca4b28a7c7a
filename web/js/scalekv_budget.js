// ScaleKV budget widget: the KV cache per scale, drawn on the ScaleKV Cache Config node (live, from its widgets)
// and on the Infinity Sampler after a run (planned beside measured, from its "scalekv_memory" UI output).
//
// Every number comes from the pack's route POST /scalekv/plan (nodes/routes.py), which asks the engine's planner;
// this file only gathers widget values from the graph, formats the answer and draws bar widths.
// DOM widgets only (canvas draw() widgets are not repainted in Nodes 2.0), never serialized into the prompt.
// Colours come from ComfyUI's palette variables (--input-text, --comfy-input-bg, ...), so light themes read too.
// The config widget re-plans on change events (widget callbacks, connections, nodes added/removed, graph loads,
// the frontend's "graphChanged"); only values set by scripts, which raise no event, wait for a slow check.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EXTENSION = "scalekv.budget_widget";
const ROUTE = "/scalekv/plan";
const CONFIG = "ScaleKVCacheConfig";
const SAMPLER = "InfinitySampler";
const LOADER = "InfinityModelLoader";
const MEMORY = "InfinityMemory";
const CALIBRATE = "ScaleKVCalibrate";
// Node types whose changes can alter a config widget's plan: their edits and links are listened to.
const WATCHED = [CONFIG, SAMPLER, LOADER, MEMORY, CALIBRATE];
const WIDGET = "scalekv_budget";
const CONFIG_FIELDS = ["policy", "budget_unit", "budget", "window", "kernel", "pooling", "scoring", "kv_dtype",
  "budget_source", "refiner_decay"];
// The loader's widgets that size the whole job (its files and their storage formats).
const LOADER_FIELDS = ["transformer", "vae", "text_encoder", "precision", "weight_format", "t5_weights"];
const DEFAULT_MODEL = "2b";
const DEFAULT_RESOLUTION = "1024x1024 (1:1)";
const DEBOUNCE_MS = 250;
// A script that assigns widget.value raises no event in LiteGraph or Nodes 2.0 (no setter, no callback), so such
// values are noticed by this slow comparison; every user edit arrives through an event first.
const FALLBACK_MS = 2000;
const MIN_WIDTH = 520; // room for the per-scale columns at 12px

// Text uses the palette's own pairs (input text on the input background; the dim parts are description text moved a
// quarter toward the input text); the coloured figures are mixed toward the text colour too, so every text keeps
// its contrast in dark and light palettes.
const CSS = `
.skv-root { font: 12px/1.35 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; color: var(--input-text, #ddd);
  background: var(--comfy-input-bg, #222); border: 1px solid var(--border-color, #4e4e4e); border-radius: 4px;
  padding: 4px 6px; box-sizing: border-box; width: 100%; overflow: hidden; pointer-events: auto; position: relative;
  --skv-d: #f0a040; --skv-r: #4aa3f0; --skv-m: #3fb950; --skv-bad: var(--error-text, #f44);
  --skv-full: color-mix(in srgb, var(--input-text, #ddd) 22%, transparent);
  --skv-dim: color-mix(in srgb, var(--descrip-text, #999) 75%, var(--input-text, #ddd)); }
.skv-head { display: flex; flex-wrap: wrap; gap: 2px 8px; align-items: center; margin-bottom: 3px; }
.skv-head b { color: var(--fg-color, #fff); font-weight: 600; }
.skv-head select { font: inherit; background: var(--bg-color, #202020); color: var(--input-text, #ddd);
  border: 1px solid var(--border-color, #4e4e4e); border-radius: 3px; padding: 0 2px; }
.skv-dim, .skv-grid > .skv-h { color: var(--skv-dim); }
.skv-legend { display: flex; flex-wrap: wrap; gap: 0 10px; margin-bottom: 2px; color: var(--skv-dim); }
.skv-grid { display: grid; grid-template-columns: 64px minmax(40px, 1fr) repeat(4, auto); column-gap: 6px;
  row-gap: 1px; align-items: center; }
.skv-grid.skv-with-measured { grid-template-columns: 64px minmax(40px, 1fr) repeat(6, auto); }
.skv-grid > .skv-h { font-size: 11px; }
.skv-grid > .skv-n { text-align: right; white-space: nowrap; }
.skv-grid > .skv-last-note { grid-column: 2 / -1; white-space: normal; color: var(--skv-dim); }
.skv-bars { position: relative; height: 12px; }
.skv-bar { position: absolute; left: 0; border-radius: 1px; min-width: 1px; }
.skv-bar-full { top: 0; height: 12px; background: var(--skv-full); }
.skv-bar-d { top: 1px; height: 5px; background: var(--skv-d); }
.skv-bar-r { top: 6px; height: 5px; background: var(--skv-r); }
.skv-bar-m { top: 0; height: 12px; border-right: 2px solid var(--skv-m); background: transparent; }
.skv-key { display: inline-block; width: 10px; height: 8px; margin-right: 3px; border-radius: 1px; }
.skv-key-d { background: var(--skv-d); } .skv-key-r { background: var(--skv-r); }
.skv-key-full { background: var(--skv-full); } .skv-key-m { border-right: 2px solid var(--skv-m); width: 8px; }
.skv-foot { margin-top: 3px; display: flex; flex-wrap: wrap; gap: 0 10px; }
.skv-measured, .skv-fits { color: color-mix(in srgb, var(--skv-m) 35%, var(--input-text, #ddd)); }
.skv-error, .skv-no-fit { color: color-mix(in srgb, var(--skv-bad) 45%, var(--input-text, #ddd)); }
.skv-error { white-space: normal; }
.skv-job { white-space: normal; font-weight: 600; }
.skv-note { white-space: normal; color: var(--skv-dim); }
`;

function injectCss() {
  if (document.getElementById("scalekv-budget-css")) return;
  const style = document.createElement("style");
  style.id = "scalekv-budget-css";
  style.textContent = CSS;
  document.head.appendChild(style);
}

// ------------------------------------------------------------------------------------------ formatting

const tok = (n) => (n === null || n === undefined ? "–" : String(n));
function mb(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
const pct = (part, whole) => (whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0);

// ------------------------------------------------------------------------------------------ graph reading

const widgetValue = (node, name) => node?.widgets?.find((w) => w.name === name)?.value;
// The frontend's Reroute nodes pass a link through unchanged, so the graph is read through them (a link's own
// reroute points, in newer frontends, are not nodes: links keep their ends). At most MAX_HOPS of them in a row.
const REROUTE = "Reroute";
const MAX_HOPS = 64;
const isType = (node, type) => node && (node.type === type || node.comfyClass === type);
function inputNode(node, name) {
  const slot = node?.findInputSlot?.(name);
  let up = slot === undefined || slot < 0 ? null : node.getInputNode(slot);
  for (let hops = 0; isType(up, REROUTE) && hops < MAX_HOPS; hops++) up = up.getInputNode?.(0) ?? null;
  return isType(up, REROUTE) ? null : up;
}
// The nodes an output feeds, through Reroute nodes, nearest first.
function outputNodes(node) {
  const found = [];
  const seen = new Set();
  let frontier = node.getOutputNodes?.(0) || [];
  for (let hops = 0; frontier.length && hops < MAX_HOPS; hops++) {
    const next = [];
    for (const n of frontier) {
      if (!n || seen.has(n.id)) continue;
      seen.add(n.id);
      if (isType(n, REROUTE)) next.push(...(n.getOutputNodes?.(0) || []));
      else found.push(n);
    }
    frontier = next;
  }
  return found;
}
function connectedSampler(config) {
  return outputNodes(config).find((n) => isType(n, SAMPLER)) || null;
}

// What the cache-config widget plans for: its widgets, plus the connected sampler's resolution/batch/cfg and the
// loader's transformer file, or the defaults the widget's header offers when they are not connected.
function configRequest(node, state) {
  const body = {};
  for (const f of CONFIG_FIELDS) {
    const v = widgetValue(node, f);
    if (v !== undefined) body[f] = v;
  }
  const linked = node.inputs?.find((i) => i.name === "budget_file")?.link;
  const ctx = { sampler: false, loader: false, samplerId: null, budgetFileLinked: linked !== null && linked !== undefined };
  // A ScaleKV Calibrate on budget_file: its widgets name the file it writes (the route plans it once it exists).
  const calibrate = ctx.budgetFileLinked ? inputNode(node, "budget_file") : null;
  if (isType(calibrate, CALIBRATE)) {
    const c = { filename_prefix: widgetValue(calibrate, "filename_prefix"),
      resolution: widgetValue(calibrate, "resolution"), budget: widgetValue(calibrate, "budget") };
    const model = inputNode(calibrate, "model");
    if (isType(model, LOADER) && widgetValue(model, "transformer")) c.transformer = widgetValue(model, "transformer");
    body.calibration = c;
  }
  const sampler = connectedSampler(node);
  if (sampler) {
    ctx.sampler = true;
    ctx.samplerId = sampler.id;
    body.resolution = widgetValue(sampler, "resolution");
    body.batch = widgetValue(sampler, "batch");
    body.cfg = widgetValue(sampler, "cfg");
    const tile = widgetValue(sampler, "decode_tile");
    if (tile !== undefined) body.decode_tile = tile;
    const memory = inputNode(sampler, "memory");
    if (isType(memory, MEMORY) && widgetValue(memory, "block_swap") !== undefined) {
      body.block_swap = widgetValue(memory, "block_swap");
    }
    const loader = inputNode(sampler, "model");
    if (isType(loader, LOADER) && widgetValue(loader, "transformer")) {
      ctx.loader = true;
      for (const f of LOADER_FIELDS) {
        const v = widgetValue(loader, f);
        if (v !== undefined) body[f] = v;
      }
    }
  }
  if (!ctx.sampler) body.resolution = state.resolution;
  if (!ctx.loader) body.model = state.model;
  return { body, ctx };
}

// What decides the drawing: the request, whether a budget file arrives through a link (a note then), and how many
// calibrations finished (a linked Calibrate's file may exist now).
let calibrations = 0;
const requestKey = (body, ctx) => JSON.stringify([body, ctx.budgetFileLinked, body.calibration ? calibrations : 0]);

// ------------------------------------------------------------------------------------------ drawing

function headerSelect(options, value, label, onChange) {
  const s = el("select");
  s.title = label;
  for (const o of options) {
    const opt = el("option", null, o.label ?? o);
    opt.value = o.value ?? o;
    s.appendChild(opt);
  }
  s.value = value;
  s.addEventListener("change", () => onChange(s.value));
  for (const ev of ["pointerdown", "mousedown", "wheel"]) s.addEventListener(ev, (e) => e.stopPropagation());
  return s;
}

function drawHeader(root, state, answer, ctx) {
  const head = el("div", "skv-head");
  const m = answer.model || {};
  const name = (m.name || m.architecture || "").replace(/^infinity-/, "Infinity-").replace(/-(\d+)b$/, "-$1B");
  const modelBox = el("span", "skv-model");
  if (ctx && !ctx.loader && answer.mode === "plan") {
    modelBox.append(headerSelect((answer.choices?.models || [DEFAULT_MODEL]).map((v) => ({
      value: v, label: `Infinity-${v.toUpperCase()}` })), state.model, "model shape (no loader connected)",
    (v) => { state.model = v; state.schedule(0); }));
    modelBox.append(el("span", "skv-dim", " (default)"));
  } else {
    modelBox.append(el("b", null, name || "model"));
    const src = m.source && m.source !== "default" ? ` ${m.source}` : "";
    modelBox.append(el("span", "skv-dim", `${src} · ${m.depth} layers`));
  }
  head.append(modelBox);
  const resBox = el("span", "skv-resolution");
  if (ctx && !ctx.sampler && answer.mode === "plan") {
    resBox.append(headerSelect(answer.choices?.resolutions || [DEFAULT_RESOLUTION], state.resolution,
      "resolution (no sampler connected)", (v) => { state.resolution = v; state.schedule(0); }));
    resBox.append(el("span", "skv-dim", " (default)"));
  } else {
    resBox.append(el("b", null, answer.resolution));
  }
  head.append(resBox);
  head.append(el("span", "skv-dim", `batch ${answer.batch} · ${answer.batch_rows} rows`));
  const budget = answer.budget_tokens !== null && answer.budget_tokens !== undefined
    ? `${answer.policy} · ${answer.budget_tokens} tokens/layer` : `${answer.policy}`;
  head.append(el("span", "skv-budget", budget));
  root.append(head);
}

// The colour key of the bars: drafters orange, refiners blue (all layers for other policies), full cache grey,
// what the run held green (sampler, after a run).
function drawLegend(root, answer) {
  const legend = el("div", "skv-legend");
  const keys = [["d", "drafters", "layers that look widely: the larger capacity"],
    answer.policy === "scalekv" ? ["r", "refiners", "layers that look locally: the smaller capacity"]
      : ["r", "layers", "what each layer keeps"],
    ["full", "full cache", "what every layer would hold without compression"]];
  if (answer.mode === "report") keys.push(["m", "measured", "what the run's cache really held"]);
  if (answer.policy !== "scalekv") keys.shift(); // no drafters outside ScaleKV
  for (const [cls, text, title] of keys) {
    const item = el("span", `skv-legend-item skv-legend-${cls}`);
    item.append(el("i", `skv-key skv-key-${cls}`), text);
    item.title = title;
    legend.append(item);
  }
  root.append(legend);
}

function drawRows(root, answer) {
  const measured = answer.mode === "report";
  const grid = el("div", "skv-grid" + (measured ? " skv-with-measured" : ""));
  const heads = ["scale", "", "drafters", "refiners", "MB", "full MB"];
  if (measured) heads.push("held", "meas. MB");
  for (const h of heads) grid.append(el("span", "skv-h" + (h && h !== "scale" ? " skv-n" : ""), h));
  if (answer.policy !== "scalekv") grid.children[3].textContent = "layers";
  const rows = answer.scales || [];
  const maxFull = Math.max(1, ...rows.map((r) => r.full_tokens));
  for (const r of rows) {
    const label = el("span", "skv-scale", `${r.scale} `);
    label.append(el("span", "skv-dim", `${r.grid[0]}×${r.grid[1]}`));
    label.dataset.scale = r.scale;
    grid.append(label);
    const bars = el("div", "skv-bars");
    bars.title = `scale ${r.scale}: full cache ${r.full_tokens} tokens/layer; drafters ${tok(r.drafter_tokens)}, ` +
      `refiners ${tok(r.refiner_tokens)} tokens; buffers ${mb(r.buffer_mb)} MB`;
    const full = el("div", "skv-bar skv-bar-full");
    full.style.width = `${pct(r.full_tokens, maxFull)}%`;
    bars.append(full);
    if (r.drafter_tokens !== null) {
      const d = el("div", "skv-bar skv-bar-d");
      d.style.width = `${pct(r.drafter_tokens, maxFull)}%`;
      bars.append(d);
    }
    const rr = el("div", "skv-bar skv-bar-r");
    rr.style.width = `${pct(r.refiner_tokens, maxFull)}%`;
    bars.append(rr);
    if (measured && r.measured) {
      const held = el("div", "skv-bar skv-bar-m");
      held.style.width = `${pct(Math.max(r.measured.drafter_tokens ?? 0, r.measured.refiner_tokens ?? 0), maxFull)}%`;
      bars.append(held);
    }
    grid.append(bars);
    const dText = r.drafters ? `${r.drafters}×${tok(r.drafter_tokens)}` : "–";
    const rText = r.refiners ? `${r.refiners}×${r.refiner_tokens_min !== r.refiner_tokens
      ? `${r.refiner_tokens_min}…${r.refiner_tokens}` : tok(r.refiner_tokens)}` : "–";
    grid.append(el("span", "skv-n skv-d", dText), el("span", "skv-n skv-r", rText),
      el("span", "skv-n skv-mb", mb(r.stored_mb)), el("span", "skv-n skv-full skv-dim", mb(r.full_mb)));
    if (measured) {
      const m = r.measured || {};
      grid.append(el("span", "skv-n skv-held skv-measured", m.matches_plan ? "= plan" : tok(m.stored_tokens)),
        el("span", "skv-n skv-meas skv-measured", mb(m.stored_mb)));
    }
  }
  const last = answer.last_scale;
  if (last) { // the last scale's keys and values are used once and never cached: no bar, no figures
    const label = el("span", "skv-last-scale", `${last.scale} `);
    label.append(el("span", "skv-dim", `${last.grid[0]}×${last.grid[1]}`));
    grid.append(label, el("span", "skv-last-note", "never stored: the last scale's keys/values are not cached"));
  }
  root.append(grid);
}

function drawFooter(root, answer, lastRun) {
  const t = answer.totals || {};
  const foot = el("div", "skv-foot");
  const stored = el("span", null, "cache ");
  stored.append(el("b", "skv-stored-peak", mb(t.stored_peak_mb)), ` MB of `, el("span", "skv-full-total", mb(t.full_mb)),
    ` MB full (${(100 * (t.stored_ratio ?? 1)).toFixed(1)}%)`);
  const peak = el("span", null, "planned peak ");
  peak.append(el("b", "skv-planned-peak", mb(t.planned_peak_mb)), " MB ");
  // the config node and the sampler plan the same way: for the longest prompt T5 takes (an older report: its own)
  peak.append(el("span", "skv-dim skv-planned-for", answer.text_tokens
    ? `for prompts up to ${answer.text_tokens} tokens` : "for this run's prompt"));
  if (answer.text_tokens && t.prompt_peak_mb !== undefined && t.prompt_peak_mb !== null) {
    peak.title = `this run's prompt alone: ${mb(t.prompt_peak_mb)} MB planned`;
  }
  foot.append(stored, peak);
  root.append(foot);
  const m = answer.measured;
  if (m) {
    const line = el("div", "skv-foot skv-measured");
    const p = el("span", null, "measured peak ");
    p.append(el("b", "skv-measured-peak", mb(m.peak_mb)), " MB");
    const s = el("span", null, "stored ");
    s.append(el("b", "skv-measured-stored", mb(m.stored_peak_mb)), " MB");
    line.append(p, s, el("span", "skv-match", m.matches_plan ? "held = plan" : "held ≠ plan"));
    if (m.sampling_seconds) line.append(el("span", "skv-dim", `${m.sampling_seconds.toFixed(2)} s`));
    line.title = m.measurement || "";
    root.append(line);
  } else if (lastRun) {
    const line = el("div", "skv-foot skv-measured skv-last-run");
    const p = el("span", null, "last run: measured peak ");
    p.append(el("b", "skv-measured-peak", mb(lastRun.measured_peak_mb)), " MB (planned ",
      el("span", null, mb(lastRun.planned_peak_mb)), " MB)");
    line.append(p);
    root.append(line);
  }
  if (answer.job) {
    const job = el("div", "skv-foot skv-job " + (answer.job.fits ? "skv-fits" : "skv-no-fit"), answer.job.line);
    job.dataset.fits = String(answer.job.fits);
    for (const k of ["peak", "sampling", "decode", "transformer", "t5"]) job.dataset[`${k}Mb`] = String(answer.job[`${k}_mb`]);
    job.title = `${answer.job.setting}\nT5 encode ${mb(answer.job.encode_mb)} MB · sampling ${mb(answer.job.sampling_mb)} MB · ` +
      `decode ${mb(answer.job.decode_mb)} MB (weights included: transformer ${mb(answer.job.transformer_mb)} MB, ` +
      `T5 ${mb(answer.job.t5_mb)} MB, VAE ${mb(answer.job.vae_mb)} MB)`;
    root.append(job);
  }
  if (answer.note) root.append(el("div", "skv-note", answer.note));
}

function draw(state) {
  const root = state.root;
  root.replaceChildren();
  if (state.error) {
    root.append(el("div", "skv-error", state.error));
  } else if (!state.answer) {
    root.append(el("div", "skv-note skv-dim", state.placeholder));
  } else {
    drawHeader(root, state, state.answer, state.ctx);
    drawLegend(root, state.answer);
    drawRows(root, state.answer);
    // a run's figures belong to the sampler and settings that made them: not shown once either changed
    const lastRun = state.lastRun && state.ctx?.samplerId === state.lastRun.samplerId && state.key === state.lastRun.key
      ? state.lastRun : null;
    drawFooter(root, state.answer, lastRun);
    if (state.answer.budget_file_note) { // a linked ScaleKV Calibrate: its file, or why not yet
      root.append(el("div", "skv-note skv-budget-file", state.answer.budget_file_note));
    } else if (state.ctx?.budgetFileLinked) { // only scalekv reads it: the node sets it aside for other policies
      root.append(el("div", "skv-note skv-budget-file", widgetValue(state.node, "policy") === "scalekv"
        ? "budget_file is linked: the run uses that file; this is budget_source's plan"
        : "budget_file is linked, but only the scalekv policy reads budget files: the run does not use it"));
    }
  }
  root.dataset.state = state.error ? "error" : state.answer ? state.answer.mode : "empty";
  root.dataset.version = String(++state.version);
  fitNode(state);
}

// Height the widget asks for: measured from its content (the node grows, never shrinks under the user's size).
function fitNode(state) {
  const node = state.node;
  requestAnimationFrame(() => {
    // The content's own height (its last child's bottom), not the root's: Nodes 2.0 stretches the root to fill the
    // node, so the root's height would grow the node by the margin on every drawing.
    const last = state.root.lastElementChild;
    const content = last ? last.offsetTop + last.offsetHeight + 6 : state.root.scrollHeight; // + padding, border
    const h = Math.ceil(content) + 16; // the frontend keeps a margin of the widget's height
    if (Math.abs(h - state.height) < 2) return;
    state.height = h;
    const want = node.computeSize?.();
    if (want && node.size && (node.size[1] < want[1] || node.size[0] < want[0])) {
      node.setSize([Math.max(node.size[0], want[0]), Math.max(node.size[1], want[1])]);
    }
    node.setDirtyCanvas?.(true, true);
  });
}

// ------------------------------------------------------------------------------------------ requests

async function fetchPlan(state, body) {
  const seq = ++state.seq;
  let answer = null;
  let error = null;
  try {
    const r = await api.fetchApi(ROUTE, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
    if (r.ok) answer = data;
    else error = data.error || `HTTP ${r.status}`;
  } catch (e) {
    error = `ScaleKV plan unavailable: ${e?.message || e}`;
  }
  if (seq !== state.seq) return; // a newer request was sent meanwhile
  state.answer = answer;
  state.error = error;
  draw(state);
}

// ------------------------------------------------------------------------------------------ change events

const configs = new Set(); // the config widgets on the page
let fallbackTimer = null;

// Something that may alter a plan happened: every config widget re-reads the graph after the debounce (a request
// with the same values as the last one sends nothing). `reason` is kept on the widget for the browser test.
function graphChanged(reason = "event") {
  for (const state of configs) state.schedule(DEBOUNCE_MS, reason);
}

// The slow check for values set by scripts (see FALLBACK_MS); it runs only while a config widget exists.
function watchFallback() {
  if (configs.size && !fallbackTimer) fallbackTimer = setInterval(() => configs.forEach((s) => s.watch()), FALLBACK_MS);
  if (!configs.size && fallbackTimer) { clearInterval(fallbackTimer); fallbackTimer = null; }
}

// Wrap a prototype or instance method so it also reports a change (the original runs first, its result kept).
function chain(target, name, after) {
  const orig = target[name];
  target[name] = function () {
    const r = orig?.apply(this, arguments);
    after.apply(this, arguments);
    return r;
  };
}

// Widget edits: classic widgets call their callback and node.onWidgetChanged; a Nodes 2.0 edit reaches the callback
// or, at the latest, the frontend's graphChanged (the browser test types a budget in both modes). Widgets a node
// gains later (converted inputs) are caught by graphChanged too.
function listenToWidgets(node) {
  for (const w of node.widgets || []) {
    if (w.name !== WIDGET) chain(w, "callback", () => graphChanged());
  }
}

function attach(node, kind) {
  injectCss();
  const root = el("div", "skv-root");
  root.dataset.scalekv = kind;
  const state = {
    node, kind, root, answer: null, error: null, ctx: null, key: null, seq: 0, version: 0, height: 0,
    model: DEFAULT_MODEL, resolution: DEFAULT_RESOLUTION, report: null, lastRun: null, timer: null, reason: null,
    placeholder: kind === CONFIG ? "planning the cache…" : "ScaleKV memory: planned and measured figures after a run",
  };
  // One request per settled set of values: changes restart the debounce timer, identical values send nothing.
  state.refresh = () => {
    state.timer = null;
    if (state.kind !== CONFIG || !node.graph) return;
    const { body, ctx } = configRequest(node, state);
    const key = requestKey(body, ctx);
    if (key === state.key) return;
    state.key = key;
    state.ctx = ctx;
    root.dataset.trigger = state.reason || "event"; // what noticed the change: an event or the slow check
    fetchPlan(state, body);
  };
  state.schedule = (delay = DEBOUNCE_MS, reason = "event") => {
    clearTimeout(state.timer);
    state.reason = reason;
    state.timer = setTimeout(state.refresh, delay);
  };
  state.watch = () => { // the slow check: values changed with no event, seen by comparing with the last request
    if (state.timer || !node.graph) return; // an event's refresh is already on its way
    const { body, ctx } = configRequest(node, state);
    if (requestKey(body, ctx) !== state.key) state.schedule(0, "fallback");
  };
  const widget = node.addDOMWidget(WIDGET, "scalekv_budget", root, {
    serialize: false, hideOnZoom: false,
    getValue: () => undefined, setValue: () => {},
    getMinHeight: () => Math.max(state.height, 28),
  });
  widget.serialize = false; // not in widgets_values either
  if (node.size && node.size[0] < MIN_WIDTH) node.size = [MIN_WIDTH, node.size[1]];
  state.widget = widget;
  node.__scalekv = state;
  chain(node, "onRemoved", () => { clearTimeout(state.timer); configs.delete(state); watchFallback(); });
  draw(state);
  if (kind === CONFIG) {
    configs.add(state);
    watchFallback();
    state.schedule(0);
  }
  return state;
}

function showReport(sampler, report) {
  const state = sampler.__scalekv;
  if (!state || !report) return;
  state.report = report;
  state.ctx = null;
  fetchPlan(state, { report });
  const config = inputNode(sampler, "cache_config");
  if (config?.__scalekv) {
    // the planned peak as both widgets show it: for the longest prompt (an older report: its own prompt's)
    config.__scalekv.lastRun = { measured_peak_mb: report.measured_peak_mb,
      planned_peak_mb: report.planned_peak_max_prompt_mb ?? report.planned_peak_mb, samplerId: sampler.id,
      key: config.__scalekv.key };
    draw(config.__scalekv);
  }
}

app.registerExtension({
  name: EXTENSION,
  async setup() {
    // The frontend's change tracker: fired after user actions that changed the workflow (edits in either display
    // mode, nodes added, removed or pasted, links drawn), where the frontend has it.
    api.addEventListener?.("graphChanged", () => graphChanged());
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!WATCHED.includes(nodeData?.name)) return;
    const proto = nodeType.prototype;
    // Links made or broken, widgets changed on the canvas, nodes added to or removed from a graph, graphs loaded.
    for (const hook of ["onConnectionsChange", "onWidgetChanged", "onAdded", "onRemoved", "onConfigure"]) {
      chain(proto, hook, () => graphChanged());
    }
    if (nodeData.name === SAMPLER) {
      chain(proto, "onExecuted", function (message) { showReport(this, message?.scalekv_memory?.[0]); });
    } else if (nodeData.name === CALIBRATE) {
      // a finished calibration may have written the file a linked config widget names
      chain(proto, "onExecuted", () => { calibrations += 1; graphChanged(); });
    }
  },
  nodeCreated(node) {
    if (WATCHED.some((t) => isType(node, t))) listenToWidgets(node);
    if (isType(node, CONFIG)) attach(node, CONFIG);
    else if (isType(node, SAMPLER)) attach(node, SAMPLER);
  },
  afterConfigureGraph() {
    graphChanged(); // a workflow was loaded: its values arrived after the nodes were created
  },
});
