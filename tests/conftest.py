# tests/comfy needs ComfyUI and its venv: scripts/test.sh runs it separately (see tests/comfy/conftest.py).
# tests/server drives a real ComfyUI server (a subprocess in ComfyUI's venv) for minutes: `pytest tests` leaves it
# out unless SCALEKV_SERVER_TESTS is set; naming the folder (`pytest tests/server`) runs it (tests/server/harness.py).
import os

collect_ignore = ["comfy"]
if not os.environ.get("SCALEKV_SERVER_TESTS"):
    collect_ignore.append("server")
