// The cut an edge runs at when its user named none. The cloud proposes one (its model's
// defaultCut, a federation's cut), and a hostile cloud would propose the cut that tells it most:
// with no block at the bottom the edge sends the token embeddings themselves, which the cloud,
// owning the embedding table, reads back as the text exactly; with none at the top g_M is the
// labels' gradient through the head alone. A proposed cut is taken only with a block on each
// side; a user who wants fewer says so with --bottom / --top.
import type { Cut } from '../protocol/index.ts';
import { EdgeError } from './errors.ts';

/** The user's cut when given, else the cloud's `proposed` one if it keeps a block on each side (TANDEM_EDGE_RESPONSE_INVALID). */
export function chooseCut(given: Cut | undefined, proposed: Cut, what: string, where: string): Cut {
  if (given !== undefined) return given;
  if (proposed.bottom < 1 || proposed.top < 1) {
    throw new EdgeError('TANDEM_EDGE_RESPONSE_INVALID', `the cloud proposes ${what} (${proposed.bottom}, ${proposed.top}), with no block on the edge's ${proposed.bottom < 1 ? 'bottom: the edge would send the token embeddings themselves' : 'top: the cloud would see the labels\' gradient through the head alone'}; to run at such a cut, name it yourself (tandem edge train and generate: --bottom and --top)`, { field: what, where });
  }
  return proposed;
}
