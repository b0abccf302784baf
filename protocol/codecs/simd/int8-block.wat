(module
  (memory (export "memory") 1)
  ;; quantize(x, n, q, scales, block) -> index of the first block holding a NaN or an infinity, or -1.
  ;; x: n float32 at byte offset x; q: n int8 at q; scales: ceil(n / block) float32 at scales.
  ;; block is a multiple of 16 and n a multiple of block (the caller does any tail).
  (func (export "quantize") (param $x i32) (param $n i32) (param $q i32) (param $scales i32) (param $block i32) (result i32)
    (local $b i32) (local $end i32) (local $p i32) (local $m v128) (local $amax f32) (local $scale f32) (local $inv v128)
    (local $blockBytes i32) (local $a v128) (local $c v128) (local $d v128) (local $e v128)
    (local.set $blockBytes (i32.shl (local.get $block) (i32.const 2)))
    (local.set $end (i32.add (local.get $x) (i32.shl (local.get $n) (i32.const 2))))
    (local.set $b (i32.const 0))
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $x) (local.get $end)))
        ;; absmax of the block, on the bit patterns: |x| is x with the sign bit cleared, and for
        ;; non-negative floats the unsigned integer order is the float order (NaN and
        ;; infinity compare above every finite value), one pmaxud per four lanes
        (local.set $m (v128.const i32x4 0 0 0 0))
        (local.set $p (local.get $x))
        (block $mdone
          (loop $mloop
            (local.set $m (i32x4.max_u (local.get $m) (v128.and (v128.load (local.get $p)) (v128.const i32x4 0x7fffffff 0x7fffffff 0x7fffffff 0x7fffffff))))
            (local.set $p (i32.add (local.get $p) (i32.const 16)))
            (br_if $mloop (i32.lt_u (local.get $p) (i32.add (local.get $x) (local.get $blockBytes))))))
        (local.set $m (i32x4.max_u (local.get $m) (i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7 (local.get $m) (local.get $m))))
        (local.set $m (i32x4.max_u (local.get $m) (i8x16.shuffle 4 5 6 7 0 1 2 3 12 13 14 15 8 9 10 11 (local.get $m) (local.get $m))))
        (local.set $amax (f32x4.extract_lane 0 (local.get $m)))
        ;; NaN or infinity: stop and report the block
        (if (i32.ge_u (i32x4.extract_lane 0 (local.get $m)) (i32.const 0x7f800000)) (then (return (local.get $b))))
        (local.set $scale (f32.div (local.get $amax) (f32.const 127)))
        (f32.store (i32.add (local.get $scales) (i32.shl (local.get $b) (i32.const 2))) (local.get $scale))
        (local.set $inv (f32x4.splat (select (f32.div (f32.const 1) (local.get $scale)) (f32.const 0) (f32.gt (local.get $scale) (f32.const 0)))))
        ;; q = round_half_even(x / scale), 16 at a time: |x / scale| <= 127, so adding
        ;; 1.5 * 2^23 leaves the rounded integer in the low mantissa bits, and subtracting
        ;; that constant's bit pattern as int32 gives it in two's complement
        (local.set $p (local.get $x))
        (block $qdone
          (loop $qloop
            (local.set $a (i32x4.sub (f32x4.add (f32x4.mul (v128.load (local.get $p)) (local.get $inv)) (v128.const f32x4 12582912 12582912 12582912 12582912)) (v128.const i32x4 0x4b400000 0x4b400000 0x4b400000 0x4b400000)))
            (local.set $c (i32x4.sub (f32x4.add (f32x4.mul (v128.load offset=16 (local.get $p)) (local.get $inv)) (v128.const f32x4 12582912 12582912 12582912 12582912)) (v128.const i32x4 0x4b400000 0x4b400000 0x4b400000 0x4b400000)))
            (local.set $d (i32x4.sub (f32x4.add (f32x4.mul (v128.load offset=32 (local.get $p)) (local.get $inv)) (v128.const f32x4 12582912 12582912 12582912 12582912)) (v128.const i32x4 0x4b400000 0x4b400000 0x4b400000 0x4b400000)))
            (local.set $e (i32x4.sub (f32x4.add (f32x4.mul (v128.load offset=48 (local.get $p)) (local.get $inv)) (v128.const f32x4 12582912 12582912 12582912 12582912)) (v128.const i32x4 0x4b400000 0x4b400000 0x4b400000 0x4b400000)))
            (v128.store (local.get $q)
              (i8x16.narrow_i16x8_s (i16x8.narrow_i32x4_s (local.get $a) (local.get $c)) (i16x8.narrow_i32x4_s (local.get $d) (local.get $e))))
            (local.set $q (i32.add (local.get $q) (i32.const 16)))
            (local.set $p (i32.add (local.get $p) (i32.const 64)))
            (br_if $qloop (i32.lt_u (local.get $p) (i32.add (local.get $x) (local.get $blockBytes))))))
        (local.set $x (i32.add (local.get $x) (local.get $blockBytes)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (br $blocks)))
    (i32.const -1))
  ;; dequantize(q, n, scales, block, out): out = q * scale, per block; block a multiple of 16.
  (func (export "dequantize") (param $q i32) (param $n i32) (param $scales i32) (param $block i32) (param $out i32)
    (local $end i32) (local $s v128) (local $v v128) (local $blockEnd i32) (local $h v128)
    (local.set $end (i32.add (local.get $q) (local.get $n)))
    (block $done
      (loop $blocks
        (br_if $done (i32.ge_u (local.get $q) (local.get $end)))
        (local.set $s (v128.load32_splat (local.get $scales)))
        (local.set $blockEnd (i32.add (local.get $q) (local.get $block)))
        (loop $vloop
          (local.set $v (v128.load (local.get $q)))
          (local.set $h (i16x8.extend_low_i8x16_s (local.get $v)))
          (v128.store (local.get $out) (f32x4.mul (f32x4.convert_i32x4_s (i32x4.extend_low_i16x8_s (local.get $h))) (local.get $s)))
          (v128.store offset=16 (local.get $out) (f32x4.mul (f32x4.convert_i32x4_s (i32x4.extend_high_i16x8_s (local.get $h))) (local.get $s)))
          (local.set $h (i16x8.extend_high_i8x16_s (local.get $v)))
          (v128.store offset=32 (local.get $out) (f32x4.mul (f32x4.convert_i32x4_s (i32x4.extend_low_i16x8_s (local.get $h))) (local.get $s)))
          (v128.store offset=48 (local.get $out) (f32x4.mul (f32x4.convert_i32x4_s (i32x4.extend_high_i16x8_s (local.get $h))) (local.get $s)))
          (local.set $q (i32.add (local.get $q) (i32.const 16)))
          (local.set $out (i32.add (local.get $out) (i32.const 64)))
          (br_if $vloop (i32.lt_u (local.get $q) (local.get $blockEnd))))
        (local.set $scales (i32.add (local.get $scales) (i32.const 4)))
        (br $blocks))))
)
