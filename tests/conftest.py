# tests/comfy needs ComfyUI and its venv: scripts/test.sh runs it separately (see tests/comfy/conftest.py).
collect_ignore = ["comfy"]
