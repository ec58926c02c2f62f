# The collector image: `moxco serve` with the collector extra (FastAPI, uvicorn, psycopg).
# Built from the repository root: docker compose -f deploy/docker-compose.yml build
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /src
# torch is a dependency of the package (the agent side); the collector only needs its CPU build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY moxco moxco
COPY agent agent
COPY collector collector
COPY dashboards dashboards
RUN pip install ".[collector]" && useradd --system --uid 10001 moxco
USER moxco
EXPOSE 8000
ENTRYPOINT ["moxco"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
