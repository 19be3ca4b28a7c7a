#!/usr/bin/env node
// The ScaleKV budget widget in the real ComfyUI frontend, headless Chromium (playwright-core), both display modes.
//
//   node tests/browser/widget_check.mjs --url http://127.0.0.1:8188 --out out/browser [--modes classic,vue]
//        [--docs docs/images] [--timeout 120]
//
// For each mode (classic canvas, Nodes 2.0 = Comfy.VueNodes.Enabled) it builds the pack's graph in the page with
// LiteGraph.createNode (tiny model files, 256x256), then records what the widgets show:
//   initial   the cache-config widget's rows for budget 48 tokens, window 4
//   budget    after the user types 24 into the budget widget (classic: the canvas's value prompt; Nodes 2.0: the
//             Vue number input), so the widget must follow a real edit
//   invalid   after a script sets window = 5 without calling any callback (the slow check must see it): the error
//   job_*     the fit line after the loader's weight_format and t5_weights, the sampler's decode_tile and a linked
//             Infinity Memory node's block_swap change (through the widgets' callbacks, as the frontend's widgets do)
//   executed  after a queued run (Run through app.queuePrompt): the sampler's widget with measured figures and the
//             cache-config widget's last-run line
//   contrast_dark / contrast_light   the text contrast of both widgets in the dark and the light palette
//   cal_missing / cal_file   budget_file linked from a ScaleKV Calibrate whose file is absent, then present
// Screenshots go to --out; with --docs, one PNG per node (classic mode, cropped to the node) goes there.
// It prints one JSON summary (also written to <out>/summary.json); the numbers are checked by the pytest driver
// (tests/comfy/test_comfy_browser.py) against the engine's planner. Exit 0 only if every step completed with no
// page error and no extension load error.
// playwright-core is resolved from PLAYWRIGHT_CORE_DIR (a node_modules folder), else .browser/node_modules.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { contrast, setPalette } from './palette.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const modulesDir = process.env.PLAYWRIGHT_CORE_DIR || path.join(REPO, '.browser', 'node_modules');
const { chromium } = createRequire(path.join(modulesDir, 'noop.js'))('playwright-core');

const argv = process.argv.slice(2);
const opt = (k, d) => { const i = argv.indexOf(k); return i >= 0 ? argv[i + 1] : d; };
const base = opt('--url', 'http://127.0.0.1:8188').replace(/\/$/, '');
const out = path.resolve(opt('--out', path.join(REPO, 'out', 'browser')));
const docs = opt('--docs', null);
const modes = opt('--modes', 'classic,vue').split(',');
const timeout = Number(opt('--timeout', '120')) * 1000;
fs.mkdirSync(out, { recursive: true });
if (docs) fs.mkdirSync(docs, { recursive: true });

// A new seed per mode and per call: an identical prompt would be served from the server's cache, with no run.
const SEEDS = { classic: Date.now() % 1000000, vue: (Date.now() % 1000000) + 1 };
const t0 = Date.now();
const summary = { url: base, modes: {}, page_errors: [], extension_errors: [], console_errors: [], shots: [], docs: [] };

async function settings(values) {
  const r = await fetch(`${base}/api/settings`, { method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify(values) });
  if (!r.ok) throw new Error(`POST /api/settings: HTTP ${r.status}`);
}

// In the page: the graph loader -> text encode x2 -> cache config -> sampler -> preview, laid out left to right.
// Widget values are set in the page before the graph is reloaded from its own serialization: Nodes 2.0 does not
// show later programmatic changes in its Vue widgets (a documented Nodes 2.0 behaviour).
async function buildGraph(page, seed) {
  return page.evaluate(async (seed) => {
    const app = window.comfyAPI.app.app;
    const LG = window.LiteGraph;
    app.graph.clear();
    const make = (type, pos, width, values = {}) => {
      const n = LG.createNode(type);
      if (!n) throw new Error(`node type ${type} is not registered`);
      for (const [k, v] of Object.entries(values)) {
        const w = n.widgets.find((x) => x.name === k);
        if (!w) throw new Error(`${type} has no widget ${k}`);
        w.value = v;
      }
      n.pos = pos;
      if (width) n.size = [width, n.size[1]];
      app.graph.add(n);
      return n;
    };
    const loader = make('InfinityModelLoader', [10, 10], 330, { transformer: 'infinity_tiny.safetensors',
      vae: 'vae_tiny.safetensors', text_encoder: 't5_tiny', precision: 'auto' });
    const pos = make('InfinityTextEncode', [10, 260], 330, { prompt: 'a red fox in the snow' });
    const neg = make('InfinityTextEncode', [10, 540], 330, { prompt: 'blurry' });
    const config = make('ScaleKVCacheConfig', [370, 10], 470, { policy: 'scalekv', budget_unit: 'tokens', budget: 48,
      window: 4, kernel: 5 });
    const sampler = make('InfinitySampler', [870, 10], 470, { seed, resolution: '256x256 (1:1)', batch: 1, cfg: 3 });
    const preview = make('PreviewImage', [1370, 10], 200);
    loader.connect(0, sampler, sampler.findInputSlot('model'));
    loader.connect(1, pos, 0);
    loader.connect(1, neg, 0);
    pos.connect(0, sampler, sampler.findInputSlot('positive'));
    neg.connect(0, sampler, sampler.findInputSlot('negative'));
    config.connect(0, sampler, sampler.findInputSlot('cache_config'));
    sampler.connect(0, preview, 0);
    const ids = { loader: loader.id, pos: pos.id, neg: neg.id, config: config.id, sampler: sampler.id,
      preview: preview.id };
    // Loaded as a saved workflow would be: Nodes 2.0 places nodes added one by one on its own, a loaded graph
    // keeps its layout, and the widget must pick up values that arrive after the node was created.
    const workflow = JSON.parse(JSON.stringify(app.graph.serialize()));
    await app.loadGraphData(workflow);
    const c = app.canvas;
    c.ds.scale = 1;
    c.ds.offset = [70, 110];
    c.setDirty(true, true);
    return ids;
  }, seed);
}

// What one node's budget widget shows, read back from its DOM.
async function readWidget(page, nodeId) {
  return page.evaluate((id) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    const root = node?.__scalekv?.root;
    if (!root) return null;
    const all = (sel) => [...root.querySelectorAll(sel)].map((e) => e.textContent.trim());
    const one = (sel) => root.querySelector(sel)?.textContent.trim() ?? null;
    const rect = root.getBoundingClientRect();
    const vw = window.innerWidth;
    const vh = window.innerHeight;
    return {
      state: root.dataset.state, version: Number(root.dataset.version),
      visible: rect.width > 100 && rect.height > 40 && rect.left >= 0 && rect.top >= 0 && rect.right <= vw
        && rect.bottom <= vh && getComputedStyle(root).visibility !== 'hidden' && root.offsetParent !== null,
      rect: [rect.left, rect.top, rect.width, rect.height],
      header: one('.skv-head'), model: one('.skv-model'), resolution: one('.skv-resolution'), budget: one('.skv-budget'),
      model_choice: root.querySelector('.skv-model select')?.value ?? null,
      resolution_choice: root.querySelector('.skv-resolution select')?.value ?? null,
      scales: all('.skv-scale'), drafters: all('.skv-d'), refiners: all('.skv-r'), mb: all('.skv-mb'),
      full_mb: all('.skv-full'), held: all('.skv-held'), measured_mb: all('.skv-meas'),
      stored_peak: one('.skv-stored-peak'), full_total: one('.skv-full-total'), planned_peak: one('.skv-planned-peak'),
      measured_peak: one('.skv-measured-peak'), measured_stored: one('.skv-measured-stored'), match: one('.skv-match'),
      last_run: one('.skv-last-run'), error: one('.skv-error'),
      legend: all('.skv-legend-item'), last_scale: one('.skv-last-scale'), last_note: one('.skv-last-note'),
      planned_for: one('.skv-planned-for'), budget_file_note: one('.skv-budget-file'),
      trigger: root.dataset.trigger ?? null,
      job: { text: one('.skv-job'), ...(root.querySelector('.skv-job')?.dataset ?? {}) },
    };
  }, nodeId);
}

// Wait until the widget has drawn something newer than `after` in the given state.
async function waitWidget(page, nodeId, after, state, extra = null) {
  await page.waitForFunction(({ id, after, state, extra }) => {
    const root = window.comfyAPI.app.app.graph.getNodeById(id)?.__scalekv?.root;
    if (!root || Number(root.dataset.version) <= after || root.dataset.state !== state) return false;
    if (root.getBoundingClientRect().height + 1 < root.scrollHeight) return false; // the node has not grown yet
    return !extra || root.textContent.includes(extra);
  }, { id: nodeId, after, state, extra }, { timeout, polling: 100 });
  return readWidget(page, nodeId);
}

// A user edit of a number widget: classic = click the widget's middle on the canvas, type into LiteGraph's value
// prompt, Enter; Nodes 2.0 = type into the node's Vue number input, Enter.
async function typeNumber(page, mode, nodeId, name, value) {
  if (mode === 'vue') {
    // Frontend 1.32: the input carries the aria-label; 1.49: its container does (the input is a spinbutton).
    const input = page.locator(`[data-node-id="${nodeId}"] input[aria-label="${name}"], `
      + `[data-node-id="${nodeId}"] [aria-label="${name}"] input`).first();
    // 1.49 lays a scrub overlay (drag to change) over the input: a user's click lands on it and focuses the input.
    await input.click({ force: true });
    await input.press('Control+A');
    await input.pressSequentially(String(value)); // PrimeVue's InputNumber parses keystrokes; fill() is ignored
    await input.press('Enter');
    await input.press('Tab');
    return;
  }
  const xy = await page.evaluate(({ id, name }) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const w = node.widgets.find((x) => x.name === name);
    const h = window.LiteGraph.NODE_WIDGET_HEIGHT;
    const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + h / 2]);
    const r = app.canvas.canvas.getBoundingClientRect();
    return [r.left + x, r.top + y];
  }, { id: nodeId, name });
  await page.mouse.click(xy[0], xy[1]);
  const prompt = page.locator('.graphdialog input.value');
  await prompt.waitFor({ timeout: 5000 });
  await prompt.fill(String(value));
  await prompt.press('Enter');
}

// A widget changed as the frontend's own widgets change it: the value, then the widget's callback.
async function setWidget(page, nodeId, name, value) {
  await page.evaluate(({ id, name, value }) => {
    const w = window.comfyAPI.app.app.graph.getNodeById(id).widgets.find((x) => x.name === name);
    if (!w) throw new Error(`node ${id} has no widget ${name}`);
    w.value = value;
    w.callback?.(value);
    window.comfyAPI.app.app.canvas.setDirty(true, true); // the canvas shows the new value in screenshots
  }, { id: nodeId, name, value });
}

// Poll a node's widget (as read by readWidget) until `pred` holds.
async function until(page, nodeId, pred, what) {
  const end = Date.now() + timeout;
  for (;;) {
    const w = await readWidget(page, nodeId);
    if (w && pred(w)) return w;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(w)?.slice(0, 400)}`);
    await page.waitForTimeout(100);
  }
}

// A node's rectangle on screen: the Vue element in Nodes 2.0, else title bar + body from the canvas transform.
async function nodeClip(page, nodeId) {
  return page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const ds = app.canvas.ds;
    const r = app.canvas.canvas.getBoundingClientRect();
    const [x, y] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
    const pad = 6;
    return { x: Math.max(0, r.left + x - pad), y: Math.max(0, r.top + y - pad),
      width: node.size[0] * ds.scale + 2 * pad, height: (node.size[1] + title) * ds.scale + 2 * pad };
  }, nodeId);
}

async function shot(page, name) {
  const p = path.join(out, `${name}.png`);
  await page.screenshot({ path: p });
  summary.shots.push(p);
}

async function runMode(browser, mode) {
  const res = { steps: {}, timings_ms: {} };
  summary.modes[mode] = res;
  await settings({ 'Comfy.TutorialCompleted': true, 'Comfy.VueNodes.Enabled': mode === 'vue',
    'Comfy.Notification.ShowVersionUpdates': false, 'Comfy.ColorPalette': 'dark' });
  const ctx = await browser.newContext({ viewport: { width: 1680, height: 1000 } });
  await ctx.addInitScript(() => { try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch {} });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => summary.page_errors.push(`${mode}: ${String(e.message).slice(0, 500)}`));
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const text = m.text().slice(0, 300);
    summary.console_errors.push(`${mode} after ${Object.keys(res.steps).at(-1) ?? 'start'}: ${text}`);
    if (/Error loading extension|already registered/.test(text)) summary.extension_errors.push(`${mode}: ${text}`);
  });
  try {
    await page.goto(`${base}/`, { waitUntil: 'domcontentloaded', timeout });
    // Frontend 1.49 (ComfyUI 0.33) has app.graph before it registers the node types from /object_info.
    await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph
      && window.LiteGraph?.registered_node_types?.InfinityModelLoader, null, { timeout });
    await page.waitForTimeout(1000); // extensions' setup()
    res.extensions = await page.evaluate(() => window.comfyAPI.app.app.extensions.map((e) => e.name)
      .filter((n) => n.startsWith('scalekv')));
    res.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    res.vue_nodes = await page.evaluate(() => !!document.querySelector('.graph-canvas-container, body')
      && window.comfyAPI.app.app.ui.settings.getSettingValue('Comfy.VueNodes.Enabled'));
    await page.evaluate(() => {
      const { api } = window.comfyAPI.api;
      window.__skv = { events: [] };
      for (const t of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted'])
        api.addEventListener(t, (e) => window.__skv.events.push([t, e.detail]));
    });
    res.timings_ms.app_ready = Date.now() - t0;
    const ids = await buildGraph(page, SEEDS[mode]);
    res.ids = ids;
    res.steps.initial = await waitWidget(page, ids.config, 0, 'plan', 'infinity_tiny.safetensors');
    res.steps.sampler_before_run = await readWidget(page, ids.sampler);
    await page.waitForTimeout(300);
    await shot(page, `${mode}_initial`);

    let v = res.steps.initial.version;
    await typeNumber(page, mode, ids.config, 'budget', 24);
    res.steps.budget = await waitWidget(page, ids.config, v, 'plan', '24 tokens/layer');
    res.steps.budget_widget_value = await page.evaluate((id) => window.comfyAPI.app.app.graph.getNodeById(id)
      .widgets.find((w) => w.name === 'budget').value, ids.config);
    await shot(page, `${mode}_budget`);

    v = res.steps.budget.version;
    await page.evaluate((id) => { window.comfyAPI.app.app.graph.getNodeById(id).widgets
      .find((w) => w.name === 'window').value = 5; }, ids.config);
    res.steps.invalid = await waitWidget(page, ids.config, v, 'error');
    await shot(page, `${mode}_invalid`);
    v = res.steps.invalid.version;
    await page.evaluate((id) => { window.comfyAPI.app.app.graph.getNodeById(id).widgets
      .find((w) => w.name === 'window').value = 4; }, ids.config);
    res.steps.restored = await waitWidget(page, ids.config, v, 'plan', '24 tokens/layer');

    // The fit line follows what sizes the whole job: the loader's formats, the sampler's decode tile, block swap.
    for (const [step, id, name, value] of [['weights', ids.loader, 'weight_format', 'fp8_e4m3fn'],
      ['t5', ids.loader, 't5_weights', 'int8'], ['tile', ids.sampler, 'decode_tile', 8]]) {
      v = (await readWidget(page, ids.config)).version;
      await setWidget(page, id, name, value);
      res.steps[`job_${step}`] = await waitWidget(page, ids.config, v, 'plan');
    }
    v = (await readWidget(page, ids.config)).version;
    ids.memory = await page.evaluate((ids) => { // an Infinity Memory node linked to the sampler's memory input
      const app = window.comfyAPI.app.app;
      const n = window.LiteGraph.createNode('InfinityMemory');
      n.pos = [870, 700];
      app.graph.add(n);
      const sampler = app.graph.getNodeById(ids.sampler);
      n.connect(0, sampler, sampler.findInputSlot('memory'));
      return n.id;
    }, ids);
    res.steps.job_memory_linked = await waitWidget(page, ids.config, v, 'plan');
    v = res.steps.job_memory_linked.version;
    await setWidget(page, ids.memory, 'block_swap', 2);
    res.steps.job_swap = await waitWidget(page, ids.config, v, 'plan');
    await shot(page, `${mode}_job`);
    await page.evaluate((ids) => { // back to the run's settings: memory node removed, formats and tile reset
      const graph = window.comfyAPI.app.app.graph;
      graph.remove(graph.getNodeById(ids.memory));
      for (const [id, name, value] of [[ids.loader, 'weight_format', 'none'], [ids.loader, 't5_weights', 'none'],
        [ids.sampler, 'decode_tile', 0]]) {
        const w = graph.getNodeById(id).widgets.find((x) => x.name === name);
        w.value = value;
        w.callback?.(value);
      }
    }, ids);
    const jobBefore = res.steps.restored.job.text + res.steps.restored.job.peakMb;
    res.steps.job_restored = await until(page, ids.config, (w) => w.state === 'plan'
      && w.job.text + w.job.peakMb === jobBefore && w.version > res.steps.job_swap.version, 'the job line restored');

    res.api_prompt = await page.evaluate(async () => (await window.comfyAPI.app.app.graphToPrompt()).output);
    const before = await readWidget(page, ids.sampler);
    const configBefore = await readWidget(page, ids.config);
    await page.evaluate(async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); });
    await page.waitForFunction(() => window.__skv.events.some(([t]) =>
      ['execution_success', 'execution_error', 'execution_interrupted'].includes(t)), null, { timeout });
    const events = await page.evaluate(() => window.__skv.events);
    res.exec_events = events.map(([t, d]) => (t === 'execution_error' ? [t, d] : t));
    res.prompt_id = events.find(([t]) => t === 'execution_start')?.[1]?.prompt_id ?? null;
    if (!events.some(([t]) => t === 'execution_success')) throw new Error(`run failed: ${JSON.stringify(res.exec_events)}`);
    res.steps.executed = await waitWidget(page, ids.sampler, before.version, 'report');
    await page.waitForFunction(({ id, after }) => Number(window.comfyAPI.app.app.graph.getNodeById(id)
      .__scalekv.root.dataset.version) > after, { id: ids.config, after: configBefore.version }, { timeout });
    res.steps.config_after_run = await readWidget(page, ids.config);
    await page.waitForTimeout(500);
    await shot(page, `${mode}_executed`);
    res.timings_ms.executed = Date.now() - t0;
    if (docs && mode === 'classic') await docShots(page, ids, ['loader', 'text_encode', 'sampler', 'calibrate']);

    // Both widgets in the dark and the light palette: every text's contrast against the widget's background.
    res.steps.contrast_dark = await contrast(page, [ids.config, ids.sampler]);
    await setPalette(page, 'light');
    res.steps.contrast_light = await contrast(page, [ids.config, ids.sampler]);
    await shot(page, `${mode}_light`);
    await setPalette(page, 'dark');

    // budget_file linked from a ScaleKV Calibrate: first a prefix whose file does not exist, then one that does
    // (the pytest driver wrote skvtest_256x256_10pct.json into the server's models/scalekv).
    v = (await readWidget(page, ids.config)).version;
    ids.calibrate = await page.evaluate((ids) => {
      const app = window.comfyAPI.app.app;
      const n = window.LiteGraph.createNode('ScaleKVCalibrate');
      n.pos = [370, 760];
      for (const [k, x] of [['filename_prefix', 'skvnone'], ['resolution', '256x256 (1:1)'], ['budget', 10]]) {
        n.widgets.find((w) => w.name === k).value = x;
      }
      app.graph.add(n);
      const loader = app.graph.getNodeById(ids.loader);
      loader.connect(0, n, n.findInputSlot('model'));
      loader.connect(1, n, n.findInputSlot('t5'));
      const config = app.graph.getNodeById(ids.config);
      n.connect(0, config, config.findInputSlot('budget_file'));
      return n.id;
    }, ids);
    res.steps.cal_missing = await waitWidget(page, ids.config, v, 'plan', 'not in models/scalekv yet');
    v = res.steps.cal_missing.version;
    await setWidget(page, ids.calibrate, 'filename_prefix', 'skvtest');
    res.steps.cal_file = await waitWidget(page, ids.config, v, 'plan', 'written by the linked');
    await shot(page, `${mode}_calibrate`);
    v = res.steps.cal_file.version;
    await page.evaluate((id) => { const g = window.comfyAPI.app.app.graph; g.remove(g.getNodeById(id)); }, ids.calibrate);
    res.steps.cal_removed = await until(page, ids.config, (w) => w.version > v && w.state === 'plan'
      && w.budget_file_note === null, 'the calibration note gone');

    // Reroute nodes between the config and the sampler and between the loader and the sampler: the widget reads
    // through them (it planned the default 2B at 1024x1024 before), and a run's figures still reach it.
    v = (await readWidget(page, ids.config)).version;
    ids.reroutes = await page.evaluate((ids) => {
      const app = window.comfyAPI.app.app;
      const graph = app.graph;
      const sampler = graph.getNodeById(ids.sampler);
      const made = [];
      for (const [from, input, pos] of [[ids.config, 'cache_config', [700, 80]], [ids.loader, 'model', [700, 40]]]) {
        const first = window.LiteGraph.createNode('Reroute');
        const second = window.LiteGraph.createNode('Reroute');
        first.pos = pos;
        second.pos = [pos[0] + 60, pos[1]];
        graph.add(first);
        graph.add(second);
        graph.getNodeById(from).connect(0, first, 0);
        first.connect(0, second, 0);
        second.connect(0, sampler, sampler.findInputSlot(input));
        made.push(first.id, second.id);
      }
      return made;
    }, ids);
    // the same plan reads the same through them (nothing is sent again); the sampler's resolution then changes
    // behind them, and the widget follows with the loader's file
    await setWidget(page, ids.sampler, 'resolution', '320x256 (1.25:1)');
    res.steps.rerouted = await waitWidget(page, ids.config, v, 'plan', '320x256 (1.25:1)');
    await shot(page, `${mode}_rerouted`);
    await setWidget(page, ids.sampler, 'resolution', '256x256 (1:1)');

    // No sampler downstream: the widget falls back to the defaults its header offers (2B, 1024x1024), and the
    // user can pick another model shape there.
    v = (await readWidget(page, ids.config)).version;
    await page.evaluate((id) => { window.comfyAPI.app.app.graph.getNodeById(id).disconnectOutput(0); }, ids.config);
    res.steps.defaults = await waitWidget(page, ids.config, v, 'plan', '(default)');
    await shot(page, `${mode}_defaults`);
    v = res.steps.defaults.version;
    await page.locator(`.skv-root[data-scalekv="ScaleKVCacheConfig"] .skv-model select`).selectOption('8b');
    res.steps.defaults_8b = await waitWidget(page, ids.config, v, 'plan', '(default)');
    await shot(page, `${mode}_defaults_8b`);

    if (docs && mode === 'classic') await docShots(page, ids, ['cache_config']);
  } finally {
    await ctx.close();
  }
}

// One PNG per node for the README, cropped to the node (the calibrate node is added for its picture only).
async function docShots(page, ids, which) {
  const calibrate = !which.includes('calibrate') ? null : await page.evaluate((ids) => {
    const app = window.comfyAPI.app.app;
    const n = window.LiteGraph.createNode('ScaleKVCalibrate');
    n.pos = [1370, 330];
    n.size = [360, n.size[1]];
    app.graph.add(n);
    const loader = app.graph.getNodeById(ids.loader);
    loader.connect(0, n, n.findInputSlot('model'));
    loader.connect(1, n, n.findInputSlot('t5'));
    app.canvas.deselectAll?.();
    app.canvas.setDirty(true, true);
    return n.id;
  }, ids);
  await page.waitForTimeout(400);
  const names = { loader: ids.loader, text_encode: ids.pos, sampler: ids.sampler, calibrate, cache_config: ids.config };
  for (const name of which) {
    const id = names[name];
    if (name === 'cache_config') { // shown as a user would first see it: 2B at 1024x1024, the paper's 10%
      const v = (await readWidget(page, id)).version;
      await page.evaluate((id) => {
        const node = window.comfyAPI.app.app.graph.getNodeById(id);
        const set = (k, x) => { node.widgets.find((w) => w.name === k).value = x; };
        set('budget_unit', 'percent'); set('budget', 10); set('window', 16);
        const state = node.__scalekv;
        state.model = '2b';
        state.schedule(0);
      }, id);
      await waitWidget(page, id, v, 'plan', '650 tokens/layer'); // the paper's 10% of 6425 tokens
    }
    // each node moved to the same clear spot of the viewport, away from the toolbars, toasts and minimap
    await page.evaluate((id) => {
      const app = window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [400 - node.pos[0], 140 - node.pos[1]];
      app.canvas.setDirty(true, true);
    }, id);
    await page.waitForTimeout(400);
    const p = path.join(docs, `node_${name}.png`);
    await page.screenshot({ path: p, clip: await nodeClip(page, id) });
    summary.docs.push(p);
  }
  await page.evaluate(() => {
    const c = window.comfyAPI.app.app.canvas;
    c.ds.offset = [70, 110];
    c.setDirty(true, true);
  });
  await page.waitForTimeout(300);
}

let rc = 0;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
try {
  for (const mode of modes) await runMode(browser, mode);
} catch (e) {
  summary.fatal = String(e?.stack || e);
  rc = 2;
} finally {
  await browser.close();
}
if (summary.page_errors.length || summary.extension_errors.length) rc = rc || 1;
summary.ok = rc === 0;
summary.seconds = (Date.now() - t0) / 1000;
fs.writeFileSync(path.join(out, 'summary.json'), JSON.stringify(summary, null, 1));
console.log(JSON.stringify(summary));
process.exit(rc);
