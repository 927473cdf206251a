// Summarise http-cache-tests results: ours against the implementations the suite ships
// results for (Varnish, nginx, ...). Usage: node conformance_summary.mjs SUITE_DIR OURS.json
import { pathToFileURL } from 'url'
import fs from 'fs'
import path from 'path'

const [suiteDir, oursFile] = process.argv.slice(2)
const load = (p) => import(pathToFileURL(path.join(suiteDir, p)).href)
const tests = (await load('tests/index.mjs')).default
tests.push((await load('tests/surrogate-control.mjs')).default)
const display = await load('lib/display.mjs')
const index = (await load('results/index.mjs')).default

const implementations = [{ name: 'jsoncache', results: JSON.parse(fs.readFileSync(oursFile)) }]
for (const item of index) {
  if (item.type === 'rev-proxy') {
    implementations.push({
      name: `${item.name} ${item.version}`,
      results: JSON.parse(fs.readFileSync(path.join(suiteDir, 'results', item.file)))
    })
  }
}
const kinds = ['✅', '⛔️', '⚠️', 'Y', 'N', '🔹', '⁉️', '⚪️', '-']
const names = { '✅': 'pass', '⛔️': 'fail', '⚠️': 'optional fail', Y: 'yes', N: 'no',
  '🔹': 'setup fail', '⁉️': 'harness fail', '⚪️': 'dependency fail', '-': 'untested' }
const summary = {}
const requiredFails = {}
for (const impl of implementations) {
  const counts = Object.fromEntries(kinds.map(k => [k, 0]))
  requiredFails[impl.name] = []
  for (const suite of tests) {
    if (suite.id === 'surrogate-control') continue // a CDN extension, not RFC 9111
    for (const test of suite.tests) {
      if (test.browser_only) continue
      const r = display.determineTestResult(tests, test.id, impl.results)[2]
      counts[r] += 1
      if (r === '⛔️') requiredFails[impl.name].push(test.id)
    }
  }
  summary[impl.name] = counts
}
const header = ['implementation'.padEnd(34), ...kinds.filter(k => k !== '-').map(k => names[k].padStart(15))].join('')
console.log(header)
for (const [name, counts] of Object.entries(summary)) {
  console.log([name.padEnd(34), ...kinds.filter(k => k !== '-').map(k => String(counts[k]).padStart(15))].join(''))
}
console.log(`\nrequired tests jsoncache fails (${requiredFails.jsoncache.length}):`)
for (const id of requiredFails.jsoncache) {
  const others = implementations.slice(1).filter(i => requiredFails[i.name].includes(id)).map(i => i.name.split(' ')[0])
  const msg = implementations[0].results[id]
  console.log(`  ${id}${others.length ? '  (also fails: ' + others.join(', ') + ')' : ''}  ${Array.isArray(msg) ? msg.slice(1).join(' ') : ''}`)
}

if (process.env.CONFORMANCE_DETAILS) {
  console.log('\nother results of jsoncache that are not a pass:')
  for (const suite of tests) {
    if (suite.id === 'surrogate-control') continue
    for (const test of suite.tests) {
      if (test.browser_only) continue
      const r = display.determineTestResult(tests, test.id, implementations[0].results)[2]
      if (!['✅', 'Y', '⛔️'].includes(r)) {
        const msg = implementations[0].results[test.id]
        console.log(`  ${r} ${test.id} (${test.kind || 'required'}) ${Array.isArray(msg) ? msg.slice(1).join(' ') : ''}`)
      }
    }
  }
}
