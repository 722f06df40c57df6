"""UI-format workflow (what the browser saves) -> API format (what /prompt runs), as the frontend's
graphToPrompt does it, for checking that each example workflow matches its API twin.

Widget values are positional, in the order of the node's widget inputs; an INT with
``control_after_generate`` (a seed) is followed by one extra value ("fixed", "randomize"...), and so is
a file combo with an upload button (Load Image, Load Video: "image").
Muted (mode 2) and bypassed (mode 4) nodes and frontend-only nodes (Note) are left out.
"""

from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")

# Widget order of the native ComfyUI nodes the examples use (0.3.64; the e2e test compares these
# with the real /object_info).
NATIVE_WIDGETS: dict[str, list[tuple[str, bool]]] = {
    "CLIPLoader": [("clip_name", False), ("type", False), ("device", False)],
    "CLIPTextEncode": [("text", False)],
    "VAELoader": [("vae_name", False)],
    "VAEDecode": [],
    "LoadImage": [("image", True)],  # the upload button's value ("image") follows the file name
    "LoadVideo": [("file", True)],
    "GetVideoComponents": [],
    "CreateVideo": [("fps", False)],
    "SaveVideo": [("filename_prefix", False), ("format", False), ("codec", False)],
}


def widget_names(node_class) -> list[tuple[str, bool]]:
    """[(widget name, has a control_after_generate value)] of a V1 node class, in UI order."""
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, bool(opts.get("control_after_generate"))))
    return out


def ui_to_api(workflow: dict, classes: dict[str, type]) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if node["type"] in NATIVE_WIDGETS:
            widgets = NATIVE_WIDGETS[node["type"]]
        else:
            widgets = widget_names(classes[node["type"]])
        values = list(node.get("widgets_values", []))
        inputs: dict = {}
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, has_control in widgets:
            if not values:  # the page would fill in the default: shipped workflows must store every widget
                raise ValueError(f"node {node['id']} ({node['type']}): no value for widget {name!r}")
            value = values.pop(0)
            if has_control:
                values.pop(0)
            if name not in linked:
                inputs[name] = value
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            _, src, src_slot, *_ = links[slot["link"]]
            inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
