// The cloud's echo of the session's defenses in Welcome (protocol v1.1). The edge applies its
// defenses itself whatever the cloud says, but a v1.1 cloud that welcomes a session with other
// defenses than the edge offered has not agreed to what the edge is doing: refuse it.
import { compareVersions } from '../protocol/index.ts';
import type { Defense, Welcome } from '../protocol/index.ts';
import { EdgeError } from './errors.ts';

const V1_1 = { major: 1, minor: 1 } as const;

function same(a: Defense, b: Defense): boolean {
  return a.name === b.name && a.scale === b.scale && a.clip === b.clip && a.noiseStd === b.noiseStd;
}

function describe(list: readonly Defense[]): string {
  return list.length === 0 ? 'none' : list.map((d) => d.name).join(', ');
}

/** Throws unless a Welcome at v1.1 or later echoes exactly the offered defenses (a v1.0 Welcome has no such field). */
export function checkDefenseEcho(offered: readonly Defense[], welcome: Welcome): void {
  if (compareVersions(welcome.version, V1_1) < 0) return;
  const echoed = welcome.defenses ?? [];
  if (echoed.length !== offered.length || offered.some((d) => !echoed.some((e) => same(d, e)))) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud welcomed defenses ${describe(echoed)}; the edge offered ${describe(offered)}`, { field: 'welcome.defenses' });
  }
}
