"""The ``vit2cbsa`` command: convert, inspect, export and publish CBSA-converted Vision Transformers.

``vit2cbsa convert``  loads a pretrained ViT, converts it and saves it (see :mod:`vit2cbsa.hub`);
``vit2cbsa inspect``  shows which attention layers would be converted and what that changes
                      (tokens, FLOPs, parameters) at a given resolution, without any weights;
``vit2cbsa push``     uploads a saved folder to the Hugging Face Hub with a model card;
``vit2cbsa export``   converts MODEL (if it is not a converted folder already) and writes a ``torch.export``
                      program (.pt2) or an ONNX file checked in ONNX Runtime (:mod:`vit2cbsa.export`);
``vit2cbsa explain``  saves the attention maps of one image as a PNG (:mod:`vit2cbsa.analysis`).

MODEL arguments are resolved by :func:`vit2cbsa.loading.resolve`, the same for every command, in this
order: ``cifar10-teacher`` (the embedded CIFAR-10 teacher), a local folder (a vit2cbsa folder, a
transformers folder with ``config.json``, or a timm checkpoint folder), a timm model name
(``vit_base_patch16_224``, ``hf-hub:timm/...``), then a Hugging Face Hub repo id. transformers never
runs code from a model folder or repo (``trust_remote_code=False``). Errors are reported as one line on
stderr with exit status 1 (``--traceback`` shows the full trace); warnings as ``vit2cbsa: warning: ...``.

* :mod:`.main` -- the parser and the dispatch (:func:`main`, :func:`explain_main`, :func:`build_parser`);
* :mod:`.commands` -- convert, inspect, push, export; :mod:`.explain` -- explain;
* :mod:`.models` -- the one loader of MODEL for every command (:func:`~.models.load_model`);
* :mod:`.options` -- declaring a sub-command, and the conversion options;
* :mod:`.parsing` -- argument types (grid, resolution, layers, metric);
* :mod:`.console` -- one-line warnings and errors.
"""

from .main import build_parser, explain_main, main

__all__ = ["build_parser", "explain_main", "main"]
