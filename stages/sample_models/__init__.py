"""Sample models that ship with the package, for the demo and the tests.

A synthetic Llama and tokenizer, and the real SmolLM2-135M installed offline."""
