"""Layer 2, compress: a policy made into a real smaller / lower-precision model. One module per
knob family (search.compress.knobs registers them), the build, the byte counter."""
