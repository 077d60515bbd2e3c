//go:build tools

// Package tools pins the Helm client that renders and installs charts/dynvol in the tests.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
