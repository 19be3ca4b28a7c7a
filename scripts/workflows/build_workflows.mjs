#!/usr/bin/env node
// Builds the example workflows in the real ComfyUI frontend and saves them with their thumbnails.
//
//   node scripts/workflows/build_workflows.mjs --url http://127.0.0.1:8212 [--out workflows]
//
// Needs a running ComfyUI with this pack mounted (scripts/workflows/build_workflows.sh starts one), headless
// Chromium (/usr/bin/chromium or $CHROMIUM) and playwright-core, looked up in $PLAYWRIGHT_DIR, .browser/, /tmp/pw
// and the current folder. Every graph is made in the page with LiteGraph.createNode, laid out in columns, saved as
// app.graph.serialize() (the UI format the frontend's own Save writes) to <out>/<name>.json, and the canvas area
// holding it was the thumbnail until the workflows learnt to run: now each is queued once (the embedded model, a
// few seconds on a CPU) and its output images, captioned, are screenshot to <out>/<name>.jpg, the template
// browser's thumbnail. The JSON is saved before the run, so the saved seeds are the ones below.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const argv = process.argv.slice(2);
const opt = (name, fallback) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : fallback; };
const base = opt('--url', 'http://127.0.0.1:8212').replace(/\/$/, '');
const outDir = path.resolve(opt('--out', path.join(REPO, 'workflows')));

function loadPlaywright() {
  const dirs = [process.env.PLAYWRIGHT_DIR, path.join(REPO, '.browser'), '/tmp/pw', process.cwd()].filter(Boolean);
  for (const dir of dirs) {
    try { return createRequire(path.join(dir, 'noop.js'))('playwright-core'); } catch { /* next */ }
  }
  throw new Error(`playwright-core not found in ${dirs.join(', ')}: npm install playwright-core in one of them ` +
                  '(or bash scripts/setup_browser.sh); never `npx playwright install`');
}

// ------------------------------------------------------------------------------------------ the workflows

// What the embedded default model (default_model/) is called in the loader's menus, and its resolution.
const LOADER = { transformer: 'infinity_shapes.safetensors', vae: 'infinity_shapes_vae.safetensors',
                 text_encoder: 't5_shapes', precision: 'auto' };
const RESOLUTION = "auto (the model's own size)";  // 256x256 for the embedded model, 1024x1024 for 2B/8B
// Captions of the kind the default model was trained on (scalekv_core/training/shapes.py).
const PROMPT = 'a large red circle at the top left on a blue background';
const CALIBRATION_PROMPTS = [
  'a large red circle at the top left on a blue background',
  'a small yellow star at the center on a black background',
  'a large green square at the bottom right and a small white triangle at the top on a purple background',
  'a large orange triangle at the left on a white background',
].join('\n');
const SEED = 3;
const SAMPLER = { seed: SEED, control_after_generate: 'randomize', cfg: 3.0, tau: 0.5, top_k: 900, top_p: 0.97,
                  resolution: RESOLUTION, batch: 1 };
const SCALEKV_10 = { policy: 'scalekv', budget_unit: 'percent', budget: 10, budget_source: 'generated' };

// nodes: key -> {type, col (layout column), title?, size? (else SIZES or the node's own), widgets};
// links: [from, output, to, input] by slot names.
const SIZES = { InfinityModelLoader: [360, 0], InfinityTextEncode: [400, 140], ScaleKVCacheConfig: [470, 0],
                SaveImage: [300, 340], Note: [360, 220] };
// What each workflow's title group says, and its Note node (what to do, in an artist's words).
const TITLES = {
  scalekv_text_to_image: 'Infinity text to image with ScaleKV (10% of the cache)',
  full_vs_scalekv: 'Full cache against ScaleKV 10%, from one seed',
  calibrate_then_generate: 'Calibrate ScaleKV for your model, then generate',
};
const NOTES = {
  scalekv_text_to_image: 'Write your prompt, then Queue.\n\nRuns as is on the small model that comes with the pack '
    + '(256x256, coloured shapes). For Infinity-2B or 8B pick their files in the loader: resolution auto follows the '
    + 'model. On a small GPU set weight_format to fp8_e4m3fn (8B on 12 GB) or int4 (8 GB).\n\n'
    + 'The ScaleKV panel shows the memory per scale and whether the whole job fits your GPU.',
  full_vs_scalekv: 'One prompt, one seed, two samplers: the first keeps the full cache, the second ScaleKV at 10%. '
    + 'Compare the two pictures and the memory each sampler reports after the run.\n\nThe seed node feeds both '
    + 'samplers and changes after every run.',
  calibrate_then_generate: 'ScaleKV Calibrate draws the four captions with the full cache, finds the drafter '
    + 'layers and writes a budget file to models/scalekv; the cache config uses it through budget_file.\n\n'
    + 'Write captions like the pictures you will make. Calibration runs again only when its inputs change.',
};
const WORKFLOWS = {
  scalekv_text_to_image: {
    nodes: {
      loader: { type: 'InfinityModelLoader', col: 0, widgets: LOADER },
      note: { type: 'Note', col: 0, title: 'Start here', widgets: { text: NOTES.scalekv_text_to_image } },
      positive: { type: 'InfinityTextEncode', col: 1, title: 'Prompt', widgets: { prompt: PROMPT } },
      cache: { type: 'ScaleKVCacheConfig', col: 1, title: 'ScaleKV Cache Config (10%)', widgets: SCALEKV_10 },
      sampler: { type: 'InfinitySampler', col: 2, widgets: SAMPLER },
      save: { type: 'SaveImage', col: 3, widgets: { filename_prefix: 'scalekv' } },
    },
    links: [
      ['loader', 't5', 'positive', 't5'],
      ['loader', 'model', 'sampler', 'model'], ['positive', 'conditioning', 'sampler', 'positive'],
      ['cache', 'cache_config', 'sampler', 'cache_config'], ['sampler', 'image', 'save', 'images'],
    ],
    thumbnail: [['save', 'ScaleKV 10%']],
  },
  full_vs_scalekv: {
    nodes: {
      loader: { type: 'InfinityModelLoader', col: 0, widgets: LOADER },
      note: { type: 'Note', col: 0, title: 'Start here', widgets: { text: NOTES.full_vs_scalekv } },
      seed: { type: 'PrimitiveInt', col: 1, title: 'Seed (both samplers)',
              widgets: { value: SEED, control_after_generate: 'randomize' } },
      positive: { type: 'InfinityTextEncode', col: 1, title: 'Prompt', widgets: { prompt: PROMPT } },
      cache: { type: 'ScaleKVCacheConfig', col: 1, title: 'ScaleKV Cache Config (10%)', widgets: SCALEKV_10 },
      full: { type: 'InfinitySampler', col: 2, title: 'Infinity Sampler (full cache)', widgets: SAMPLER },
      save_full: { type: 'SaveImage', col: 3, title: 'Save Image (full cache)', widgets: { filename_prefix: 'full' } },
      scalekv: { type: 'InfinitySampler', col: 4, title: 'Infinity Sampler (ScaleKV 10%)', widgets: SAMPLER },
      save_scalekv: { type: 'SaveImage', col: 5, title: 'Save Image (ScaleKV 10%)',
                      widgets: { filename_prefix: 'scalekv' } },
    },
    links: [
      ['loader', 't5', 'positive', 't5'], ['seed', 'INT', 'full', 'seed'], ['seed', 'INT', 'scalekv', 'seed'],
      ['loader', 'model', 'full', 'model'], ['positive', 'conditioning', 'full', 'positive'],
      ['loader', 'model', 'scalekv', 'model'], ['positive', 'conditioning', 'scalekv', 'positive'],
      ['cache', 'cache_config', 'scalekv', 'cache_config'],
      ['full', 'image', 'save_full', 'images'], ['scalekv', 'image', 'save_scalekv', 'images'],
    ],
    thumbnail: [['save_full', 'full cache'], ['save_scalekv', 'ScaleKV 10%']],
  },
  calibrate_then_generate: {
    nodes: {
      loader: { type: 'InfinityModelLoader', col: 0, widgets: LOADER },
      note: { type: 'Note', col: 0, title: 'Start here', widgets: { text: NOTES.calibrate_then_generate } },
      calibrate: { type: 'ScaleKVCalibrate', col: 1, size: [440, 330],
                   widgets: { prompts: CALIBRATION_PROMPTS, resolution: RESOLUTION, budget: 10, num_drafters: 0,
                              seed: 0, control_after_generate: 'fixed', filename_prefix: 'scalekv_budget' } },
      positive: { type: 'InfinityTextEncode', col: 2, title: 'Prompt', widgets: { prompt: PROMPT } },
      cache: { type: 'ScaleKVCacheConfig', col: 2, title: 'ScaleKV Cache Config (calibrated)',
               widgets: SCALEKV_10 },
      sampler: { type: 'InfinitySampler', col: 3, widgets: SAMPLER },
      save: { type: 'SaveImage', col: 4, widgets: { filename_prefix: 'calibrated' } },
    },
    links: [
      ['loader', 'model', 'calibrate', 'model'], ['loader', 't5', 'calibrate', 't5'],
      ['loader', 't5', 'positive', 't5'], ['calibrate', 'budget_file', 'cache', 'budget_file'],
      ['loader', 'model', 'sampler', 'model'], ['positive', 'conditioning', 'sampler', 'positive'],
      ['cache', 'cache_config', 'sampler', 'cache_config'], ['sampler', 'image', 'save', 'images'],
    ],
    thumbnail: [['save', 'calibrated ScaleKV 10%']],
  },
};

// ------------------------------------------------------------------------------------------ in the page

/** Creates one workflow's nodes and links in the page's (cleared) graph. Runs inside the browser. */
function createInPage({ spec, sizes }) {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  app.graph.clear();
  const made = {};
  for (const [key, n] of Object.entries(spec.nodes)) {
    const node = LG.createNode(n.type);
    if (!node) throw new Error(`node type ${n.type} is not registered: is the pack loaded?`);
    if (n.title) node.title = n.title;
    app.graph.add(node);
    const [w, h] = n.size ?? sizes[n.type] ?? [0, 0];
    node.setSize([w || node.size[0], h || node.size[1]]);
    for (const [name, value] of Object.entries(n.widgets)) {
      // the frontend's Note node names its one text widget differently across versions
      const widget = node.widgets?.find((x) => x.name === name) ?? (n.type === 'Note' ? node.widgets?.[0] : null);
      if (!widget) throw new Error(`${n.type} has no widget ${name}`);
      widget.value = value;
      widget.callback?.(value, app.canvas, node);
    }
    made[key] = node;
  }
  for (const [from, output, to, input] of spec.links) {
    const src = made[from], dst = made[to];
    let o = src.findOutputSlot(output);
    if (o < 0 && src.outputs?.length === 1) o = 0; // a primitive's one output, whatever its label
    const i = dst.findInputSlot(input);
    if (o < 0 || i < 0) throw new Error(`no slot ${from}.${output} -> ${to}.${input}`);
    if (!src.connect(o, dst, i)) throw new Error(`could not link ${from}.${output} -> ${to}.${input}`);
  }
  window.__workflowNodes = Object.fromEntries(Object.entries(made).map(([k, node]) => [k, node.id]));
  app.canvas.setDirty(true, true);
}

/** Lays the nodes out in columns (sizes as drawn, DOM widgets included), frames the graph in the viewport and
 *  returns the serialized graph and the screen rectangle to screenshot. Runs inside the browser. */
function layoutInPage({ spec, viewport }) {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  const GAP_X = 60, GAP_Y = 50, MARGIN = 40;
  const TITLE = LG.NODE_TITLE_HEIGHT;
  const byKey = (key) => app.graph.getNodeById(window.__workflowNodes[key]);
  const cols = [];
  for (const [key, n] of Object.entries(spec.nodes)) {
    const node = byKey(key);
    const min = node.computeSize();
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    (cols[n.col] ??= []).push(node);
  }
  // Columns left to right, nodes stacked top-down in their column, each column vertically centred.
  const heights = cols.map((c) => c.reduce((h, node) => h + node.size[1] + TITLE, 0) + GAP_Y * (c.length - 1));
  const tallest = Math.max(...heights);
  let x = 0;
  cols.forEach((col, ci) => {
    let y = (tallest - heights[ci]) / 2 + TITLE;
    for (const node of col) {
      node.pos = [x, y];
      y += node.size[1] + TITLE + GAP_Y;
    }
    x += Math.max(...col.map((node) => node.size[0])) + GAP_X;
  });
  const width = x - GAP_X;
  // Frame it: scale to fit the viewport (never above 1), offset so the graph starts at the margin.
  const ds = app.canvas.ds;
  ds.scale = Math.min(1, (viewport.width - 2 * MARGIN) / width, (viewport.height - 2 * MARGIN) / tallest);
  ds.offset = [MARGIN / ds.scale, MARGIN / ds.scale];
  // The title: a group around all the nodes, named for what the workflow does.
  const group = new LG.LGraphGroup(spec.title);
  group.pos = [-20, -70];
  group.size = [width + 40, tallest + 90 + 380];  // room below for the samplers' memory panels after a run
  app.graph.add(group);
  app.canvas.show_info = false;
  app.canvas.setDirty(true, true);
  const graph = app.graph.serialize();
  const clip = { x: MARGIN / 2, y: MARGIN / 2, width: width * ds.scale + MARGIN, height: tallest * ds.scale + MARGIN };
  return { graph, clip };
}

/** Queues the graph on the page as the Queue button does, waits for the run, and returns the SaveImage nodes'
 *  images named in spec.thumbnail as [{url, caption}]. */
async function runInPage(page, spec) {
  const before = await (await fetch(`${base}/history`)).json();
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  const deadline = Date.now() + 600000;
  let entry = null;
  while (!entry && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 500));
    const history = await (await fetch(`${base}/history`)).json();
    const done = Object.entries(history).filter(([id, e]) => !(id in before) && e.status?.completed !== undefined);
    if (done.length) entry = done[0][1];
  }
  if (!entry) throw new Error('the workflow did not finish in 10 minutes');
  if (entry.status.status_str !== 'success') throw new Error(`the run failed: ${JSON.stringify(entry.status.messages)}`);
  const ids = await page.evaluate(() => window.__workflowNodes);
  return spec.thumbnail.map(([key, caption]) => {
    const img = entry.outputs[String(ids[key])]?.images?.[0];
    if (!img) throw new Error(`no image from ${key}`);
    const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder, type: img.type });
    return { url: `${base}/view?${q}`, caption };
  });
}

/** The template browser's thumbnail: the workflow's output pictures side by side, captioned, under its title. */
async function thumbnail(browser, images, title, file) {
  const page = await browser.newPage({ viewport: { width: 800, height: 460 } });
  const cells = images.map(({ url, caption }) => `<figure><img src="${url}"><figcaption>${caption}</figcaption></figure>`);
  await page.setContent(`<style>body{margin:0;background:#202020;color:#eee;font:22px sans-serif;display:flex;
    flex-direction:column;align-items:center;justify-content:center;height:100vh}h1{font-size:24px;margin:0 0 14px}
    main{display:flex;gap:28px}figure{margin:0;text-align:center}img{width:340px;height:340px;image-rendering:auto;
    border-radius:6px}figcaption{margin-top:8px}</style><h1>${title}</h1><main>${cells.join('')}</main>`);
  await page.waitForFunction(() => [...document.images].every((i) => i.complete && i.naturalWidth > 0));
  await page.screenshot({ path: file, type: 'jpeg', quality: 85 });
  await page.close();
}

// ------------------------------------------------------------------------------------------ main

const { chromium } = loadPlaywright();
await fetch(`${base}/api/settings`, {
  method: 'POST', headers: { 'content-type': 'application/json' },
  body: JSON.stringify({ 'Comfy.TutorialCompleted': true, 'Comfy.VueNodes.Enabled': false,
                         'Comfy.Minimap.Visible': false, 'Comfy.Notification.ShowVersionUpdates': false }),
});
const viewport = { width: 1600, height: 900 };
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--disable-background-networking'],
});
const errors = [];
try {
  const ctx = await browser.newContext({ viewport });
  await ctx.addInitScript(() => { try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch { /* */ } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => errors.push(String(e.message)));
  page.on('console', (m) => { if (/Error loading extension|already registered/.test(m.text())) errors.push(m.text()); });
  await page.goto(`${base}/`, { waitUntil: 'domcontentloaded', timeout: 120000 });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph && window.LiteGraph?.registered_node_types?.InfinitySampler,
                             null, { timeout: 120000 });
  await page.waitForTimeout(1500); // extensions' setup()
  // Only the canvas and the widgets drawn over it (prompt text areas, DOM widgets) in the thumbnails.
  await page.addStyleTag({ content: 'body * { visibility: hidden !important; } '
    + '#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }' });
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, spec] of Object.entries(WORKFLOWS)) {
    await page.evaluate(createInPage, { spec, sizes: SIZES });
    await page.waitForTimeout(800); // extensions' DOM widgets settle their sizes on the next frames
    const { graph } = await page.evaluate(layoutInPage, { spec: { ...spec, title: TITLES[name] }, viewport });
    const json = path.join(outDir, `${name}.json`);
    fs.writeFileSync(json, JSON.stringify(graph, null, 2) + '\n');  // before the run: the seeds as set above
    const images = await runInPage(page, spec);
    const jpg = path.join(outDir, `${name}.jpg`);
    await thumbnail(browser, images, TITLES[name], jpg);
    console.log(`wrote ${path.relative(REPO, json)} (${graph.nodes.length} nodes, ${graph.links.length} links) and ` +
                `${path.relative(REPO, jpg)} (its output)`);
  }
  if (errors.length) throw new Error(`the page reported errors:\n${errors.join('\n')}`);
} finally {
  await browser.close();
}
