// ScaleKV Calibrate's result on its node: the budget file it wrote and the drafter layers it chose per scale,
// from the node's "scalekv_calibration" UI output (nodes/cache.py). A DOM widget, never sent with the prompt.
import { app } from "../../../scripts/app.js";

const NODE = "ScaleKVCalibrate";
const WIDGET = "scalekv_calibration";

function render(root, summary) {
  root.replaceChildren();
  const line = (text, cls) => {
    const div = document.createElement("div");
    div.textContent = text;
    if (cls) div.className = cls;
    root.append(div);
    return div;
  };
  line(`wrote ${summary.budget_file}`, "skv-cal-file").title = summary.path || "";
  line(`${summary.resolution} · ${summary.budget_percent}% = ${summary.budget_tokens} tokens/layer · ` +
    `${summary.prompts} prompt${summary.prompts === 1 ? "" : "s"}`, "skv-cal-dim");
  (summary.drafters || []).forEach((layers, scale) => {
    if (!layers.length) return; // scales that keep everything have no drafters
    line(`scale ${scale}: drafters ${layers.join(", ")}`, "skv-cal-scale");
  });
  root.dataset.state = "done";
}

app.registerExtension({
  name: "scalekv.calibration_result",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      const summary = message?.scalekv_calibration?.[0];
      if (summary) {
        if (!this.__scalekvCalibration) {
          const root = document.createElement("div");
          root.dataset.scalekv = "calibration";
          root.style.cssText = "font: 12px/1.4 ui-monospace, monospace; color: var(--fg-color, #ddd); " +
            "padding: 4px 6px; white-space: normal; overflow-wrap: anywhere;";
          const widget = this.addDOMWidget(WIDGET, WIDGET, root, { serialize: false, getValue: () => undefined,
            setValue: () => {}, getMinHeight: () => 20 + 17 * root.childElementCount });
          widget.serialize = false;
          this.__scalekvCalibration = root;
        }
        render(this.__scalekvCalibration, summary);
        this.setSize?.([this.size[0], this.computeSize?.()[1] ?? this.size[1]]);
        this.setDirtyCanvas?.(true, true);
      }
      return r;
    };
  },
});
