"""The spec layer: group rules and their geometry, spec resolution, group numbering, ``infer_spec``.

``rules`` (what a group is) → ``resolve`` (a spec broadcast to the params and validated) →
``groups`` (one flat numbering of all groups) → ``infer`` and ``families`` (rules read off a model,
torch.nn modules and the Hugging Face families' layouts).
"""
