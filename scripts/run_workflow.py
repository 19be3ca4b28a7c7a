#!/usr/bin/env python3
"""Run a ComfyUI workflow saved from the frontend (UI format) on a running server, without a browser.

    python scripts/run_workflow.py workflows/scalekv_text_to_image.json --url http://127.0.0.1:8188 --out out/run \
        [--prompt TEXT] [--negative-prompt TEXT] [--seed N] [--set NODE.INPUT=VALUE ...] [--api-out api.json]

The UI graph becomes the API prompt the frontend would send: widget values are matched to the node's inputs in
the order /object_info lists them (a seed's "control after generate" value is skipped, linked inputs become
[node, slot] references, muted nodes and notes are left out). The prompt is queued with POST /prompt, /history is
polled until it ends, every output image is downloaded through /view into --out, and the memory reports of the
Infinity Sampler (UI output "scalekv_memory") are written there as JSON: memory_report.json for one report,
memory_report_<node>.json each when several samplers report. A summary goes to stdout; on a refused prompt or a
failed run the server's message goes to stderr and the exit status is 1.

Standard library only, so it runs with any Python 3.10+ (ComfyUI's venv or the system's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

#: Input types the frontend draws as widgets (a list type is a V1 combo); others are sockets unless marked.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: INT inputs the frontend gives a "control after generate" widget even without the flag.
SEED_NAMES = ("seed", "noise_seed")
#: Frontend-only nodes: they never reach the server.
VIRTUAL_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4
MEMORY_KEY = "scalekv_memory"


class WorkflowError(RuntimeError):
    """A workflow that cannot be converted, a prompt the server refused, or a run that failed."""


# ------------------------------------------------------------------------------------------------ HTTP


def _request(url: str, data: dict | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except urllib.error.URLError as e:
        raise WorkflowError(f"no ComfyUI server answers at {url}: {e.reason}") from e
    except OSError as e:  # a timeout or a dropped connection
        raise WorkflowError(f"{url}: {e}") from e


def _get_json(url: str) -> Any:
    status, body = _request(url)
    try:
        if status == 200:
            return json.loads(body)
    except json.JSONDecodeError:
        pass
    raise WorkflowError(f"GET {url} answered {status} with no JSON: {body[:500].decode(errors='replace')}")


def object_info(base: str) -> dict:
    """Every node type the server knows, with its inputs in the order the frontend makes widgets."""
    return _get_json(f"{base}/object_info")


# ------------------------------------------------------------------------------------------------ conversion


def _links(workflow: dict) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot); links are lists in the 0.4 format, objects in the 1.0 format."""
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            table[link[0]] = (link[1], link[2])
    return table


def _ordered_inputs(info: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node type's inputs: required then optional, in the server's input_order."""
    out = []
    for group in ("required", "optional"):
        specs = info.get("input", {}).get(group) or {}
        order = (info.get("input_order") or {}).get(group) or list(specs)
        for name in order:
            spec = specs[name]
            out.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def _extra_widgets(kind: Any, name: str, opts: dict) -> int:
    """Values the frontend stores after a widget's own: control_after_generate (+ a combo's filter list)."""
    if kind == "INT" and opts.get("control_after_generate", name in SEED_NAMES):
        return 1
    if (kind == "COMBO" or isinstance(kind, list)) and opts.get("control_after_generate"):
        return 2
    return 0


def _node_label(node: dict) -> str:
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(node['title']) if node.get('title') else ''})"


def ui_to_api(workflow: dict, info: dict) -> dict:
    """The API prompt ({node id: {class_type, inputs}}) that the frontend would queue for this UI workflow."""
    if not isinstance(workflow.get("nodes"), list):
        if workflow and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return workflow  # already in the API format
        raise WorkflowError("not a ComfyUI workflow: no 'nodes' list (UI format) and no class_type entries (API format)")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported; unpack the subgraph in the frontend first")
    links = _links(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    skipped = set()
    for node in workflow["nodes"]:
        if node.get("type") in VIRTUAL_TYPES or node.get("mode") == MUTED:
            skipped.add(node["id"])
        elif node.get("mode") == BYPASSED:
            raise WorkflowError(f"{_node_label(node)} is bypassed; un-bypass or mute it (bypass is not converted)")
        elif node.get("type") in ("Reroute", "PrimitiveNode"):
            raise WorkflowError(f"{_node_label(node)}: {node['type']} nodes are not converted; connect the nodes "
                                f"directly or set the widget on the target node")
        elif node.get("type") not in info:
            raise WorkflowError(f"{_node_label(node)}: the server has no node type '{node.get('type')}' "
                                f"(is its custom node pack installed?)")
    api = {}
    for node in workflow["nodes"]:
        if node["id"] in skipped:
            continue
        spec = info[node["type"]]
        linked = {i["name"]: i.get("link") for i in node.get("inputs") or []}
        marked = {i["name"] for i in node.get("inputs") or [] if i.get("widget")}
        values = node.get("widgets_values")
        values = [] if values is None else values
        inputs: dict[str, Any] = {}
        pos = 0
        for name, kind, opts in _ordered_inputs(spec):
            is_widget = (isinstance(kind, list) or (kind in WIDGET_TYPES and not opts.get("forceInput"))
                         or name in marked)
            value = None
            if is_widget:
                if isinstance(values, dict):
                    value = values.get(name)
                else:
                    if pos >= len(values):
                        raise WorkflowError(f"{_node_label(node)}: widgets_values has {len(values)} entries, but the "
                                            f"server's '{node['type']}' needs one for '{name}' at position {pos}: "
                                            f"was the workflow saved with another version of the node?")
                    value = values[pos]
                    pos += 1 + _extra_widgets(kind, name, opts)
            link = linked.get(name)
            if link is not None:
                if link not in links:
                    raise WorkflowError(f"{_node_label(node)}: input '{name}' uses link {link}, which is not in "
                                        f"the workflow's links")
                origin, slot = links[link]
                if origin not in nodes:
                    raise WorkflowError(f"{_node_label(node)}: input '{name}' comes from node {origin}, which is "
                                        f"not in the workflow")
                if origin not in skipped:
                    inputs[name] = [str(origin), slot]
            elif is_widget:
                inputs[name] = value
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or spec.get("display_name") or node["type"]}}
    if not api:
        raise WorkflowError("the workflow has no nodes to run")
    return api


# ------------------------------------------------------------------------------------------------ overrides


def _encoders_of(api: dict, input_name: str) -> list[str]:
    """Ids of the nodes with a `prompt` input that feed some node's `input_name` (the samplers' positive/negative)."""
    found = []
    for node in api.values():
        ref = node["inputs"].get(input_name)
        if isinstance(ref, list) and ref and ref[0] in api and "prompt" in api[ref[0]]["inputs"] and ref[0] not in found:
            found.append(ref[0])
    return found


def apply_overrides(api: dict, prompt: str | None = None, negative_prompt: str | None = None, seed: int | None = None,
                    sets: list[str] | None = None) -> None:
    """--prompt/--negative-prompt go to the text nodes linked to the samplers, --seed to every sampler."""
    for value, input_name in ((prompt, "positive"), (negative_prompt, "negative")):
        if value is None:
            continue
        ids = _encoders_of(api, input_name)
        if not ids:
            raise WorkflowError(f"no text node feeds a '{input_name}' input in this workflow: nothing to set the "
                                f"{input_name} prompt on")
        for node_id in ids:
            api[node_id]["inputs"]["prompt"] = value
    if seed is not None:
        samplers = [n for n in api.values() if "seed" in n["inputs"] and "positive" in n["inputs"]]
        if not samplers:
            raise WorkflowError("no sampler with a seed in this workflow")
        for node in samplers:
            node["inputs"]["seed"] = seed
    for item in sets or []:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not name:
            raise WorkflowError(f"--set {item!r}: use NODE_ID.INPUT=VALUE, e.g. --set 5.cfg=4")
        if node_id not in api:
            raise WorkflowError(f"--set {item!r}: no node {node_id} (nodes: {', '.join(api)})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        api[node_id]["inputs"][name] = value


# ------------------------------------------------------------------------------------------------ running


def _format_refusal(body: dict) -> str:
    err = body.get("error") or {}
    lines = [f"{err.get('message', 'prompt refused')}{': ' + err['details'] if err.get('details') else ''}"]
    for node_id, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            lines.append(f"  node {node_id} ({ne.get('class_type', '?')}): {e.get('message', '')}"
                         f"{': ' + e['details'] if e.get('details') else ''}")
    return "\n".join(lines)


def queue(base: str, api: dict, workflow: dict | None = None, client_id: str | None = None) -> str:
    """POST /prompt; the UI workflow rides along in extra_pnginfo, so saved PNGs embed it as the frontend's do."""
    payload: dict[str, Any] = {"prompt": api, "client_id": client_id or uuid.uuid4().hex}
    if workflow is not None and isinstance(workflow.get("nodes"), list):
        payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
    status, body = _request(f"{base}/prompt", payload)
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        answer = {"error": {"message": body[:500].decode(errors="replace")}}
    if status != 200:
        raise WorkflowError(f"the server refused the prompt (HTTP {status}): {_format_refusal(answer)}")
    return answer["prompt_id"]


def _failure(entry: dict) -> str:
    for kind, data in (entry.get("status") or {}).get("messages") or []:
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return f"the run ended with status {entry.get('status')}"


def wait(base: str, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
    """The /history entry of a finished prompt; raises with the server's message if it failed."""
    deadline = time.monotonic() + timeout
    while True:
        history = _get_json(f"{base}/history/{prompt_id}")
        entry = history.get(prompt_id)
        status = (entry or {}).get("status") or {}
        if entry is not None and (status.get("completed") or status.get("status_str") == "error"):
            if status.get("status_str") != "success":
                raise WorkflowError(_failure(entry))
            return entry
        if time.monotonic() > deadline:
            raise WorkflowError(f"prompt {prompt_id} did not finish within {timeout:g} s")
        time.sleep(poll)


def download_images(base: str, entry: dict, out_dir: str) -> list[dict]:
    """Every image in the outputs, fetched through /view into out_dir (subfolders kept)."""
    saved = []
    for node_id, output in (entry.get("outputs") or {}).items():
        for item in output.get("images") or []:
            query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                            "type": item.get("type", "output")})
            status, body = _request(f"{base}/view?{query}")
            if status != 200:
                raise WorkflowError(f"GET /view?{query} answered {status}")
            path = os.path.join(out_dir, item.get("subfolder") or "", item["filename"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body)
            saved.append({"node": node_id, "path": path, "type": item.get("type", "output")})
    return saved


def write_memory_reports(entry: dict, out_dir: str) -> list[dict]:
    """The samplers' memory reports as JSON files: memory_report.json if there is one, else one per node."""
    reports = {node_id: output[MEMORY_KEY] for node_id, output in (entry.get("outputs") or {}).items()
               if output.get(MEMORY_KEY)}
    written = []
    for node_id, items in reports.items():
        name = "memory_report.json" if len(reports) == 1 else f"memory_report_{node_id}.json"
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(items[0] if len(items) == 1 else items, f, indent=2)
        written.append({"node": node_id, "path": path})
    return written


def run(base: str, workflow: dict, out_dir: str, timeout: float = 600.0, api_out: str | None = None,
        **overrides: Any) -> dict:
    """Convert, queue, wait, download: the summary of one run (prompt id, image files, memory report files)."""
    api = ui_to_api(workflow, object_info(base))
    apply_overrides(api, **overrides)
    if api_out:
        os.makedirs(os.path.dirname(os.path.abspath(api_out)), exist_ok=True)
        with open(api_out, "w", encoding="utf-8") as f:
            json.dump(api, f, indent=2)
    prompt_id = queue(base, api, workflow)
    entry = wait(base, prompt_id, timeout)
    os.makedirs(out_dir, exist_ok=True)
    return {"prompt_id": prompt_id, "images": download_images(base, entry, out_dir),
            "memory_reports": write_memory_reports(entry, out_dir)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", help="a workflow .json saved from the frontend (UI format; API format also works)")
    parser.add_argument("--url", default=os.environ.get("COMFY_URL", "http://127.0.0.1:8188"),
                        help="the ComfyUI server (default: $COMFY_URL or http://127.0.0.1:8188)")
    parser.add_argument("--out", default="out/workflow", help="folder for the images and memory reports")
    parser.add_argument("--prompt", help="replace the prompt of the text node(s) linked to the samplers' positive")
    parser.add_argument("--negative-prompt", help="replace the prompt linked to the samplers' negative")
    parser.add_argument("--seed", type=int, help="the seed of every sampler")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set any input (VALUE is read as JSON, else as text); repeatable")
    parser.add_argument("--api-out", help="also write the converted API prompt here")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the run (default 600)")
    args = parser.parse_args(argv)
    base = args.url.rstrip("/")
    try:
        try:
            with open(args.workflow, encoding="utf-8-sig") as f:  # ComfyUI saves UTF-8; not Windows' ANSI code page
                workflow = json.load(f)
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError (not UTF-8)
            raise WorkflowError(f"cannot read the workflow: {e}") from e
        summary = run(base, workflow, args.out, args.timeout, args.api_out, prompt=args.prompt,
                      negative_prompt=args.negative_prompt, seed=args.seed, sets=args.set)
    except (WorkflowError, OSError) as e:  # OSError: an output file that cannot be written
        print(f"run_workflow: {args.workflow}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
