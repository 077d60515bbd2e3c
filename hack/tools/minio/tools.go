//go:build tools

// Package tools pins the MinIO server the integration tests and the demo use as S3.
package tools

import _ "github.com/minio/minio"
