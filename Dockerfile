# dynvol's image, for users who build with a container engine (Docker, Podman, buildah).
# On the development machine, which has none, hack/images/build.py builds the same
# contents (Debian bookworm, python3, fuse3, s3fs, rclone, nfs-common, a venv at
# /opt/dynvol) without one; see docs/local-cluster.md.
#
#   docker build -t dynvol/dynvol:dev .
#
# One image serves all three processes: `dynvol node`, `dynvol controller` and the
# Dynamic Mount Pods' `dynvol dmp` (which runs s3fs/rclone/mount.nfs as its children).
FROM debian:bookworm-slim AS base
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates openssl \
      fuse3 s3fs rclone nfs-common procps util-linux \
 && rm -rf /var/lib/apt/lists/*

FROM base AS build
WORKDIR /src
RUN python3 -m venv /opt/dynvol
# Dependencies first (pinned), so code changes rebuild only the last layer.
COPY pyproject.toml hack/constraints.txt ./
RUN /opt/dynvol/bin/python -c "import tomllib; \
print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && /opt/dynvol/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/dynvol/bin/pip install --no-cache-dir -c constraints.txt -r requirements.txt
COPY . .
RUN /opt/dynvol/bin/pip install --no-cache-dir --no-deps -c hack/constraints.txt .

FROM base
COPY --from=build /opt/dynvol /opt/dynvol
ENV PATH=/opt/dynvol/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["/opt/dynvol/bin/dynvol"]
