#!/usr/bin/env node
// The example workflows in the real ComfyUI frontend (headless Chromium, playwright-core), classic and Nodes 2.0.
//
//   node tests/browser/workflow_check.mjs --url http://127.0.0.1:8188 --out out/browser_workflows
//        [--modes classic,vue] [--timeout 240]
//
// For each mode and each workflow the pack lists at /api/workflow_templates (the list ComfyUI's template browser
// shows under Extensions), it opens the workflow through the template browser (Templates -> the pack -> the card), gives
// its seeds fresh values (a repeated prompt would be served from the server's cache, with no run; the
// calibration's seed too, so it runs and shows its result), queues it as
// the Run button does and waits for the run. Then it records:
//   overlaps   pairs of nodes whose boxes intersect after the run (classic: LiteGraph's bounding boxes, title
//              included; Nodes 2.0: the nodes' DOM boxes)
//   previews   every preview image the server streamed during the run: its size and whether it has colour
//   widget     the ScaleKV Cache Config panel: its legend and whole-job fit line
//   contrast   the lowest WCAG contrast of the panels' text in the light palette
// It prints one JSON summary (also <out>/summary.json) for tests/comfy/test_comfy_workflow_browser.py to check,
// and screenshots each workflow after its run. Exit 0 only if every run finished with no page error.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { contrast, setPalette } from './palette.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const modulesDir = process.env.PLAYWRIGHT_CORE_DIR || path.join(REPO, '.browser', 'node_modules');
const { chromium } = createRequire(path.join(modulesDir, 'noop.js'))('playwright-core');

const argv = process.argv.slice(2);
const opt = (k, d) => { const i = argv.indexOf(k); return i >= 0 ? argv[i + 1] : d; };
const base = opt('--url', 'http://127.0.0.1:8188').replace(/\/$/, '');
const out = path.resolve(opt('--out', path.join(REPO, 'out', 'browser_workflows')));
const modes = opt('--modes', 'classic,vue').split(',');
const timeout = Number(opt('--timeout', '240')) * 1000;
fs.mkdirSync(out, { recursive: true });
const summary = { url: base, templates: null, modes: {}, page_errors: [], ok: false };

async function getJson(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`GET ${url}: HTTP ${r.status}`);
  return r.json();
}

async function settings(values) {
  const r = await fetch(`${base}/api/settings`, { method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify(values) });
  if (!r.ok) throw new Error(`POST /api/settings: HTTP ${r.status}`);
}

/** In the page: start recording the server's streamed previews (blob events, with or without metadata). */
function recordPreviews() {
  const api = window.comfyAPI.api.api;
  window.__previews = [];
  const take = async (blob) => {
    if (!(blob instanceof Blob)) return;
    const bmp = await createImageBitmap(blob);
    const c = new OffscreenCanvas(bmp.width, bmp.height);
    const g = c.getContext('2d');
    g.drawImage(bmp, 0, 0);
    const px = g.getImageData(0, 0, bmp.width, bmp.height).data;
    let chroma = 0; // the largest difference between a pixel's channels: 0 for a grey image
    for (let i = 0; i < px.length; i += 4) chroma = Math.max(chroma, Math.abs(px[i] - px[i + 1]), Math.abs(px[i + 1] - px[i + 2]));
    window.__previews.push({ width: bmp.width, height: bmp.height, chroma });
  };
  api.addEventListener('b_preview', (e) => take(e.detail));
  api.addEventListener('b_preview_with_metadata', (e) => take(e.detail?.blob));
}

/** In the page: what overlaps, and what the ScaleKV panel shows. */
function inspect(mode) {
  const app = window.comfyAPI.app.app;
  const LG = window.LiteGraph;
  const nodes = app.graph._nodes.filter((n) => n.type !== 'Note' || true);
  let boxes;
  if (mode === 'vue') {
    boxes = [...document.querySelectorAll('[data-node-id]')].map((el) => {
      const r = el.getBoundingClientRect();
      return { id: el.getAttribute('data-node-id'), box: [r.left, r.top, r.width, r.height] };
    }).filter((b) => b.box[2] > 0 && b.box[3] > 0);
  } else {
    boxes = nodes.map((n) => {
      const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - LG.NODE_TITLE_HEIGHT, n.size[0],
        n.size[1] + LG.NODE_TITLE_HEIGHT];
      return { id: String(n.id), box: b };
    });
  }
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
      const [ax, ay, aw, ah] = boxes[i].box, [bx, by, bw, bh] = boxes[j].box;
      const w = Math.min(ax + aw, bx + bw) - Math.max(ax, bx), h = Math.min(ay + ah, by + bh) - Math.max(ay, by);
      if (w > 1 && h > 1) overlaps.push([boxes[i].id, boxes[j].id, Math.round(w), Math.round(h)]);
    }
  }
  const calibrate = nodes.find((n) => n.type === 'ScaleKVCalibrate');
  const calibration = calibrate?.__scalekvCalibration?.textContent ?? null;
  const config = nodes.find((n) => n.type === 'ScaleKVCacheConfig');
  const root = config?.__scalekv?.root;
  const text = (sel) => root?.querySelector(sel)?.textContent.trim() ?? null;
  return {
    nodes: boxes.length, overlaps, calibration,
    widget: root ? { state: root.dataset.state, legend: text('.skv-legend'), job: text('.skv-job'),
                     job_fits: root.querySelector('.skv-job')?.dataset.fits ?? null,
                     answer_job: config.__scalekv.answer?.job?.line ?? null } : null,
  };
}

/** Opens a workflow as an artist does: Templates (the Browse Templates command), the pack's entry under
 *  Extensions, then the workflow's card; resolves once its nodes are on the canvas. */
async function openFromTemplates(page, pack, name) {
  await page.evaluate(() => window.comfyAPI.app.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  const dialog = page.locator('[role=dialog]');
  await dialog.getByText(pack, { exact: true }).first().click({ timeout: 20000 });
  await dialog.getByText(name, { exact: true }).first().click({ timeout: 20000 });
  await page.waitForFunction((n) => {
    const types = window.comfyAPI.app.app.graph._nodes.map((x) => x.type);
    return types.includes('InfinitySampler') && types.length === n;
  }, (await getJson(`${base}/api/workflow_templates/${encodeURIComponent(pack)}/${name}.json`)).nodes.length,
  { timeout: 20000 });
  await page.keyboard.press('Escape'); // the dialog closes on its own in most versions; never leave it open
}

async function runWorkflow(page, name, json, pack) {
  await page.evaluate(() => { window.__previews = []; });
  let openedBy = 'template browser';
  try {
    await openFromTemplates(page, pack, name);
  } catch (e) { // recorded, and the test fails on it: the workflow is still run from the same file
    openedBy = `route (the template browser failed: ${String(e.message).slice(0, 200)})`;
    await page.evaluate(async (wf) => { await window.comfyAPI.app.app.loadGraphData(wf); }, json);
  }
  await page.waitForTimeout(1500); // DOM widgets and the panel's first plan
  await page.evaluate(() => { // fresh seeds: the seed node, or the samplers' own seed widgets
    const seed = 1 + Math.floor(Math.random() * 1e9);
    for (const n of window.comfyAPI.app.app.graph._nodes) {
      for (const w of n.widgets || []) {
        if ((n.type === 'PrimitiveInt' && w.name === 'value')
            || (['InfinitySampler', 'ScaleKVCalibrate'].includes(n.type) && w.name === 'seed')) {
          w.value = seed;
        }
      }
    }
  });
  const before = await getJson(`${base}/history`);
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  const deadline = Date.now() + timeout;
  let entry = null;
  while (!entry && Date.now() < deadline) {
    await page.waitForTimeout(500);
    const history = await getJson(`${base}/history`);
    const done = Object.entries(history).filter(([id, e]) => !(id in before) && e.status?.completed !== undefined);
    if (done.length) entry = done[0][1];
  }
  if (!entry) throw new Error(`${name}: no finished run after ${timeout / 1000} s`);
  await page.waitForTimeout(2500); // the outputs reach the nodes; panels and images settle their sizes
  const res = await page.evaluate(inspect, page.__mode);
  res.opened_by = openedBy;
  // inputs the policy does not read are greyed out: none under scalekv, the scoring ones under full
  res.disabled = await page.evaluate(() => {
    const config = window.comfyAPI.app.app.graph._nodes.find((n) => n.type === 'ScaleKVCacheConfig');
    const names = () => (config.widgets || []).filter((w) => w.disabled).map((w) => w.name).sort();
    const policy = config.widgets.find((w) => w.name === 'policy');
    const before = names();
    const saved = policy.value;
    policy.value = 'full';
    policy.callback?.('full');
    const full = names();
    policy.value = saved;
    policy.callback?.(saved);
    return { scalekv: before, full, restored: names() };
  });
  // the panels' text against their background in the light palette (WCAG contrast of every text)
  const panels = await page.evaluate(() => window.comfyAPI.app.app.graph._nodes.filter((n) => n.__scalekv?.root)
    .map((n) => n.id));
  await setPalette(page, 'light');
  res.contrast_light = await contrast(page, panels);
  await setPalette(page, 'dark');
  res.status = entry.status.status_str;
  res.previews = await page.evaluate(() => window.__previews);
  const shot = path.join(out, `${page.__mode}_${name}.png`);
  await page.screenshot({ path: shot });
  res.screenshot = shot;
  return res;
}

async function runMode(browser, mode, templates) {
  const res = {};
  summary.modes[mode] = res;
  await settings({ 'Comfy.TutorialCompleted': true, 'Comfy.VueNodes.Enabled': mode === 'vue',
    'Comfy.Notification.ShowVersionUpdates': false, 'Comfy.Minimap.Visible': false,
    // full detail at any zoom in the screenshots (1.32's name of the setting, and the newer one)
    'LiteGraph.Canvas.LowQualityRenderingZoomThreshold': 0, 'LiteGraph.Canvas.MinFontSizeForLOD': 0 });
  const ctx = await browser.newContext({ viewport: { width: 1680, height: 1000 } });
  await ctx.addInitScript(() => { try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch {} });
  const page = await ctx.newPage();
  page.__mode = mode;
  page.on('pageerror', (e) => summary.page_errors.push(`${mode}: ${String(e.message).slice(0, 500)}`));
  await page.goto(`${base}/`, { waitUntil: 'domcontentloaded', timeout });
  await page.waitForFunction(() => window.comfyAPI?.app?.app?.graph
    && window.LiteGraph?.registered_node_types?.InfinitySampler, null, { timeout });
  await page.waitForTimeout(1000);
  await page.evaluate(recordPreviews);
  for (const [name, url] of templates) {
    res[name] = await runWorkflow(page, name, await getJson(url), summary.templates.pack);
  }
  await ctx.close();
}

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'] });
try {
  // The template browser's list: {pack folder: [workflow names]} from the server.
  const listed = await getJson(`${base}/api/workflow_templates`);
  const pack = Object.keys(listed).find((k) => listed[k].includes('full_vs_scalekv'));
  if (!pack) throw new Error(`the pack's workflows are not in /api/workflow_templates: ${JSON.stringify(listed)}`);
  summary.templates = { pack, names: listed[pack] };
  const templates = listed[pack].map((n) => [n, `${base}/api/workflow_templates/${encodeURIComponent(pack)}/${n}.json`]);
  for (const mode of modes) await runMode(browser, mode, templates);
  summary.ok = summary.page_errors.length === 0;
} catch (e) {
  summary.fatal = String(e?.stack || e).slice(0, 2000);
} finally {
  await browser.close();
  fs.writeFileSync(path.join(out, 'summary.json'), JSON.stringify(summary, null, 1));
  console.log(JSON.stringify(summary));
  process.exit(summary.ok ? 0 : 1);
}
