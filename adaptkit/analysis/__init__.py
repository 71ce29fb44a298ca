"""Analysis of adapters as results: per-layer statistics (:mod:`.layers`), cross-adapter comparison
(:mod:`.compare`), module depth (:mod:`.depth`); the HTML report (:mod:`.report`) only consumes them."""
