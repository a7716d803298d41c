# Test stand-in for MinIO (its images are not reachable here): moto's S3 server, the version
# requirements.lock pins, on the local base. Listens on 9000 like MinIO.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY requirements.lock /tmp/requirements.lock
ARG PIP_INDEX_URL
RUN pip install --no-cache-dir --index-url "$PIP_INDEX_URL" -c /tmp/requirements.lock "moto[server]" \
 && rm /tmp/requirements.lock
EXPOSE 9000
CMD ["moto_server", "--host", "0.0.0.0", "--port", "9000"]
