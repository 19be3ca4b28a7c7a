// ScaleKV Cache Config: the inputs the chosen policy does not read are greyed out (disabled), as the node's
// definition says: each input carries `scalekv_policies`, from scalekv_core.kvcache.config.POLICY_SETTINGS.
import { app } from "../../../scripts/app.js";

const NODE = "ScaleKVCacheConfig";

function applies(nodeData) {
  const specs = { ...(nodeData.input?.required || {}), ...(nodeData.input?.optional || {}) };
  const out = {};
  for (const [name, spec] of Object.entries(specs)) {
    const policies = spec?.[1]?.scalekv_policies;
    if (Array.isArray(policies)) out[name] = policies;
  }
  return out;
}

function mark(node, table) {
  const policy = node.widgets?.find((w) => w.name === "policy")?.value;
  for (const w of node.widgets || []) {
    const policies = table[w.name];
    if (!policies) continue;
    w.disabled = !policies.includes(policy); // drawn greyed and not editable
  }
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "scalekv.policy_inputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    const table = applies(nodeData);
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      const policy = this.widgets?.find((w) => w.name === "policy");
      if (policy) {
        const callback = policy.callback;
        policy.callback = (...args) => { const out = callback?.apply(policy, args); mark(this, table); return out; };
      }
      mark(this, table);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () { // a loaded workflow's saved policy
      const r = onConfigure?.apply(this, arguments);
      mark(this, table);
      return r;
    };
  },
});
