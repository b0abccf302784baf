// The tfjs namespace, imported from one place. The union package: tfjs-core's Node build
// registers no gradients, the union's does (and brings the cpu backend). The native packages
// import this same package.
import * as tf from '@tensorflow/tfjs';

export { tf };
