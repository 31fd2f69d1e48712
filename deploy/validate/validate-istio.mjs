// Validate Kubernetes objects against Istio's CRD schemas (npm @kubernetes-models/istio: JSON
// schema validators generated from Istio's CRDs; required fields, types, enums, formats).
//
//   node deploy/validate/validate-istio.mjs < objects.json      # a JSON array of objects
// prints a JSON array [{kind, name, ok, error}] and exits 1 if any object is invalid.
// The packages live in REVENPROX_NODE_MODULES (default: ./node_modules next to this file);
// `make deploy-deps` installs them into .build/deploy-validate/node_modules. e2e/test_deploy.py
// feeds it deploy/istio/*.yaml.
import { readFileSync } from 'node:fs';
import { pathToFileURL, fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = process.env.REVENPROX_NODE_MODULES || path.join(here, 'node_modules');
const MODELS = {
  'extensions.istio.io/v1alpha1/WasmPlugin': 'extensions.istio.io/v1alpha1/WasmPlugin.js',
  'networking.istio.io/v1/ServiceEntry': 'networking.istio.io/v1/ServiceEntry.js',
  'networking.istio.io/v1/DestinationRule': 'networking.istio.io/v1/DestinationRule.js',
  'networking.istio.io/v1beta1/ServiceEntry': 'networking.istio.io/v1beta1/ServiceEntry.js',
  'networking.istio.io/v1beta1/DestinationRule': 'networking.istio.io/v1beta1/DestinationRule.js',
  'security.istio.io/v1/RequestAuthentication': 'security.istio.io/v1/RequestAuthentication.js',
};

const docs = JSON.parse(readFileSync(0, 'utf8'));
const results = [];
for (const doc of docs) {
  const key = `${doc.apiVersion}/${doc.kind}`;
  const name = (doc.metadata && doc.metadata.name) || '';
  const file = MODELS[key];
  if (!file) {
    results.push({ kind: key, name, ok: false, error: `no schema known for ${key}` });
    continue;
  }
  const mod = await import(pathToFileURL(path.join(root, '@kubernetes-models/istio', file)).href);
  try {
    new mod[doc.kind](doc).validate();
    results.push({ kind: key, name, ok: true });
  } catch (e) {
    results.push({ kind: key, name, ok: false, error: String(e.message || e) });
  }
}
process.stdout.write(JSON.stringify(results) + '\n');
process.exit(results.every((r) => r.ok) ? 0 : 1);
