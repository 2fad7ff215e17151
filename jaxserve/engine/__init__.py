"""The engine loop: requests in, outputs out (engine.py), the host-side output path
(output_processor.py, stop_matcher.py), and prefill/decode disaggregation."""


def __getattr__(name: str):
    # `from jaxserve.engine import Engine` (the path before the folders) still works; imported
    # when first used, so importing a sibling module (request state, stop matching) stays light.
    if name in ("Engine", "EngineStats"):
        from jaxserve.engine import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'jaxserve.engine' has no attribute {name!r}")
