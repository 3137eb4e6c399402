# Placeholder: in the stand-in image `python3` is a shim that starts the
# comfyq ComfyUI simulator; this file only marks ComfyUI's directory.
