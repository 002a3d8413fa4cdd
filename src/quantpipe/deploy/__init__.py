"""Deploy: serve a published GGUF (llama-cpp-python's OpenAI-compatible server), export it for
Ollama (a Modelfile beside it), and smoke- and load-test it on loopback, logged to MLflow.

    make serve       make modelfile       make smoke        (pipelines/deploy.py)

serve.py picks the GGUF (registry champion, else quantized/model.gguf), checks its quality gate and
builds the server command; modelfile.py reads the chat template and stop tokens from the GGUF;
loadtest.py runs the server and the requests and logs the deploy run.
"""
