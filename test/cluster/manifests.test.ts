// The deployment files cannot run here: they must parse, and every `tandem` flag they use
// must exist in the command line's definitions (a renamed flag would break a deployment).
import assert from 'node:assert/strict';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { cloudCommand } from '../../cli/cloud.ts';
import { readYamlDocuments } from './yaml-subset.ts';

const INFRA = join(import.meta.dirname, '..', '..', 'infra');
const io = { out: () => undefined, log: () => undefined };

type Node = unknown;

function containers(doc: Node): { command?: string[]; args?: string[]; name: string }[] {
  const spec = (doc as { spec?: { template?: { spec?: { containers?: unknown[] } } } }).spec?.template?.spec;
  return (spec?.containers ?? []) as { command?: string[]; args?: string[]; name: string }[];
}

describe('infra/', () => {
  it('the Kubernetes manifests parse: NATS with JetStream, gateways and workers', async () => {
    const kinds: string[] = [];
    for (const name of (await readdir(join(INFRA, 'k8s'))).filter((n) => n.endsWith('.yaml'))) {
      for (const doc of readYamlDocuments(await readFile(join(INFRA, 'k8s', name), 'utf8'))) {
        const d = doc as { apiVersion?: string; kind?: string; metadata?: { name?: string } };
        assert.ok(typeof d.apiVersion === 'string' && typeof d.kind === 'string' && typeof d.metadata?.name === 'string', `${name}: apiVersion, kind and metadata.name`);
        kinds.push(`${d.kind}/${d.metadata?.name}`);
      }
    }
    for (const want of ['StatefulSet/tandem-nats', 'Deployment/tandem-gateway', 'Deployment/tandem-worker-2-8', 'Deployment/tandem-worker-8-14', 'Service/tandem-gateway']) assert.ok(kinds.includes(want), `${want} among ${kinds.join(', ')}`);
    const nats = readYamlDocuments(await readFile(join(INFRA, 'k8s', 'nats.yaml'), 'utf8'))[0] as { data: Record<string, string> };
    assert.match(nats.data['nats.conf'], /jetstream \{/);
  });

  it('every tandem flag the manifests use exists in `tandem cloud`', async () => {
    const known = new Set(cloudCommand(io).options.map((o) => o.long));
    let checked = 0;
    for (const name of (await readdir(join(INFRA, 'k8s'))).filter((n) => n.endsWith('.yaml'))) {
      for (const doc of readYamlDocuments(await readFile(join(INFRA, 'k8s', name), 'utf8'))) {
        for (const c of containers(doc)) {
          if (!(c.command ?? []).includes('tandem')) continue;
          const args = c.args ?? [];
          assert.equal(args[0], 'cloud', `${name} ${c.name}: runs tandem cloud`);
          for (const arg of args.filter((a) => String(a).startsWith('--'))) {
            assert.ok(known.has(String(arg)), `${name} ${c.name}: ${arg} is not a flag of tandem cloud`);
            checked++;
          }
          const role = args[args.indexOf('--role') + 1];
          assert.ok(role === 'gateway' || role === 'worker', `${name} ${c.name}: --role ${role}`);
        }
      }
    }
    assert.ok(checked >= 10, `${checked} flags checked`);
    assert.equal(known.has('--no-such-flag'), false);
  });

  it('the NATS configurations: one node and three clustered nodes, all with JetStream', async () => {
    const single = await readFile(join(INFRA, 'nats', 'single.conf'), 'utf8');
    assert.match(single, /jetstream \{/);
    for (const i of [0, 1, 2]) {
      const conf = await readFile(join(INFRA, 'nats', `cluster-${i}.conf`), 'utf8');
      assert.match(conf, /jetstream \{/);
      assert.match(conf, new RegExp(`server_name: tandem-nats-${i}`));
      assert.equal((conf.match(/nats-route:\/\//g) ?? []).length, 3);
    }
  });
});
