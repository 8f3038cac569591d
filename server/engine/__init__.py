"""The engine seam.  ``interface`` is torch-free and is all the HTTP layer imports;
the implementations (``server.engine.core`` and below) own every tensor and are
created by ``server.engine.build_engine`` at startup."""
