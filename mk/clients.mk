# Client recipes (docs/clients.md), run by e2e/test_clients.py against a real Envoy. Included by the
# Makefile; `make e2e` (and so `make test`) depends on client-deps.
#   make client-deps   npm ci of e2e/clients (eventsource 4.1.1, from the committed package-lock.json)
#                      into .build/clients-node; httpx and httpx-sse (pinned) into .venv

HTTPX_VERSION     := 0.28.1
HTTPX_SSE_VERSION := 0.4.3
CLIENTS_NODE_DIR  := .build/clients-node

.PHONY: client-deps

e2e: client-deps

client-deps: envoy
	@$(VENV)/bin/python -c 'import sys, importlib.metadata as m; \
		sys.exit((m.version("httpx"), m.version("httpx-sse")) != ("$(HTTPX_VERSION)", "$(HTTPX_SSE_VERSION)"))' 2>/dev/null \
		|| { set -x; $(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar on \
			'httpx==$(HTTPX_VERSION)' 'httpx-sse==$(HTTPX_SSE_VERSION)'; }
	@command -v node >/dev/null && command -v npm >/dev/null \
		|| { echo "client-deps: node and npm are needed (Node.js 20 or later; Debian: apt-get install nodejs npm)" >&2; exit 1; }
	@if ! cmp -s e2e/clients/package-lock.json $(CLIENTS_NODE_DIR)/package-lock.json \
			|| [ ! -f $(CLIENTS_NODE_DIR)/node_modules/eventsource/package.json ]; then \
		set -x; mkdir -p $(CLIENTS_NODE_DIR) \
		&& cp e2e/clients/package.json e2e/clients/package-lock.json $(CLIENTS_NODE_DIR)/ \
		&& cd $(CLIENTS_NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error; \
	fi
