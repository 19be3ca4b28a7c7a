// Shared by the browser checks: the frontend's colour palette, and the WCAG contrast of the ScaleKV panels' text.

// The WCAG contrast of every text in the nodes' budget widgets against the background it is drawn on (colours and
// opacities from getComputedStyle), the palette's input background, and the lowest ratio with its element.
export async function contrast(page, nodeIds) {
  return page.evaluate((ids) => {
    const parse = (c) => { // rgb()/rgba() (legacy or space syntax) or color(srgb r g b / a), as Chromium computes
      let m = c.match(/^rgba?\(([^)]*)\)$/);
      if (m) { const p = m[1].split(/[\s,/]+/).filter(Boolean).map(Number); return [p[0] / 255, p[1] / 255, p[2] / 255, p[3] ?? 1]; }
      m = c.match(/^color\(srgb ([^)]*)\)$/);
      if (m) { const p = m[1].split(/[\s/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p[3] ?? 1]; }
      throw new Error(`unparsed colour ${c}`);
    };
    const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat(1);
    const background = (e) => { // composited from the element up to the first opaque background
      const layers = [];
      for (let n = e; n && n.nodeType === 1; n = n.parentElement) {
        const c = parse(getComputedStyle(n).backgroundColor);
        if (c[3] > 0) layers.push(c);
        if (c[3] >= 1) break;
      }
      return layers.reverse().reduce((acc, c) => over(c, acc), [1, 1, 1, 1]);
    };
    const lum = (c) => 0.2126 * lin(c[0]) + 0.7152 * lin(c[1]) + 0.0722 * lin(c[2]);
    const lin = (v) => (v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    const ratio = (a, b) => (Math.max(lum(a), lum(b)) + 0.05) / (Math.min(lum(a), lum(b)) + 0.05);
    const texts = [];
    for (const id of ids) {
      const root = window.comfyAPI.app.app.graph.getNodeById(id).__scalekv.root;
      for (const e of [root, ...root.querySelectorAll('*')]) {
        const own = [...e.childNodes].filter((n) => n.nodeType === 3).map((n) => n.textContent).join('').trim();
        if (!own || e.getClientRects().length === 0) continue;
        let alpha = 1;
        for (let n = e; n && n.nodeType === 1; n = n.parentElement) alpha *= Number(getComputedStyle(n).opacity);
        const fg = parse(getComputedStyle(e).color);
        const bg = background(e);
        const r = ratio(over([fg[0], fg[1], fg[2], fg[3] * alpha], bg), bg);
        texts.push({ node: id, cls: e.className || e.tagName, text: own.slice(0, 40), ratio: Math.round(r * 100) / 100 });
      }
    }
    texts.sort((a, b) => a.ratio - b.ratio);
    const rootBg = background(window.comfyAPI.app.app.graph.getNodeById(ids[0]).__scalekv.root);
    return { input_bg: getComputedStyle(document.documentElement).getPropertyValue('--comfy-input-bg').trim(),
      background_luminance: Math.round(lum(rootBg) * 1000) / 1000, count: texts.length,
      min: texts[0]?.ratio ?? null, worst: texts.slice(0, 4) };
  }, nodeIds);
}

// The frontend's colour palette, set as the settings dialog sets it; resolves once its variables are applied.
export async function setPalette(page, id) {
  const before = await page.evaluate(() => getComputedStyle(document.documentElement).getPropertyValue('--comfy-input-bg'));
  await page.evaluate(async (id) => {
    const app = window.comfyAPI.app.app;
    if (app.extensionManager?.setting?.set) await app.extensionManager.setting.set('Comfy.ColorPalette', id);
    else await app.ui.settings.setSettingValueAsync('Comfy.ColorPalette', id);
  }, id);
  await page.waitForFunction((b) => getComputedStyle(document.documentElement).getPropertyValue('--comfy-input-bg') !== b,
    before, { timeout: 10000 });
  await page.waitForTimeout(300);
}
