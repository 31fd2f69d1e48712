# Deployment artifacts and their checks (docs/deploy.md, docs/browser.md). Included by the Makefile.
#   make deploy-deps     test tools: playwright, PyYAML, check-jsonschema into .venv;
#                        npm ci of deploy/validate into .build/deploy-validate (Istio CRD schemas).
#                        System packages it does NOT install (root, apt): chromium, skopeo.
#   make compose-config  regenerate deploy/compose/envoy.yaml from envoy/revenprox.yaml.tmpl
#   make wasm-oci        OCI image layout of the module in .build/oci/revenprox (VARIANT=compat|oci)
#   make deploy-check    only e2e/test_deploy.py and e2e/test_browser.py
# `make e2e` (and so `make test`) depends on deploy-deps.

PLAYWRIGHT_VERSION       := 1.65.2
PYYAML_VERSION           := 6.0.3
CHECK_JSONSCHEMA_VERSION := 0.39.0
DEPLOY_NODE_DIR          := .build/deploy-validate
VARIANT                  ?= compat

.PHONY: deploy-deps compose-config wasm-oci deploy-check

e2e: deploy-deps

deploy-deps: envoy
	@$(VENV)/bin/python -c 'import playwright, yaml, check_jsonschema' 2>/dev/null || { set -x; \
		$(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar on \
			'playwright==$(PLAYWRIGHT_VERSION)' 'PyYAML==$(PYYAML_VERSION)' \
			'check-jsonschema==$(CHECK_JSONSCHEMA_VERSION)'; }
	@if ! cmp -s deploy/validate/package-lock.json $(DEPLOY_NODE_DIR)/package-lock.json \
			|| [ ! -d $(DEPLOY_NODE_DIR)/node_modules/@kubernetes-models/istio ]; then \
		set -x; mkdir -p $(DEPLOY_NODE_DIR) \
		&& cp deploy/validate/package.json deploy/validate/package-lock.json $(DEPLOY_NODE_DIR)/ \
		&& cd $(DEPLOY_NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error; \
	fi
	@test -x /usr/bin/chromium || echo "deploy-deps: /usr/bin/chromium is missing (apt-get install -y chromium); e2e/test_browser.py will fail" >&2
	@command -v skopeo >/dev/null || echo "deploy-deps: skopeo is missing (apt-get install -y skopeo); e2e/test_deploy.py will fail" >&2

compose-config: deploy-deps
	$(VENV)/bin/python deploy/compose/render.py

wasm-oci: wasm
	$(PYTHON) deploy/oci/build_wasm_oci.py --variant $(VARIANT)

deploy-check: wasm envoy deploy-deps
	$(PYTEST) $(PYTEST_ARGS) e2e/test_deploy.py e2e/test_browser.py
