"""The language-model lab built on the attention library: a small decoder-only LM (model), byte
corpora and retrieval tasks (data), the trainer (train), evaluations (eval), NSA / full /
window-only twins side by side (compare), and the `nsa` command line (cli)."""
