"""Generated from protos/ by `just protos`; never edit by hand."""
