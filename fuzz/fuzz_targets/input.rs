//! Decodes fuzzer bytes into typed values for the structured targets (fuzz_plan, fuzz_abi).
//!
//! Every read succeeds: an exhausted input reads as zeros, so each prefix of an input is also a
//! valid input and libFuzzer's mutations stay meaningful. Numbers are drawn through a selector
//! byte that favours edge values (0, 1, powers of two, u64::MAX, NaN, infinities), which plain
//! random bytes would almost never hit.

pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    fn le(&mut self, n: usize) -> u64 {
        self.bytes(n)
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }

    pub fn u16(&mut self) -> u16 {
        self.le(2) as u16
    }

    pub fn u32(&mut self) -> u32 {
        self.le(4) as u32
    }

    pub fn u64(&mut self) -> u64 {
        self.le(8)
    }

    /// A byte count: zero, small, realistic (KiB..GiB) or at the top of the range.
    pub fn size(&mut self) -> u64 {
        match self.u8() % 10 {
            0 => 0,
            1 => u64::from(self.u8()),
            2 => u64::from(self.u16()) << 10,
            3 => u64::from(self.u16()) << 20,
            4 => u64::from(self.u32()) << 12,
            5 => u64::MAX,
            6 => u64::MAX - u64::from(self.u8()),
            7 => 1u64 << (self.u8() % 64),
            8 => self.u64(),
            _ => (1u64 << 63) + u64::from(self.u8()),
        }
    }

    /// A count such as steps or prefetch depth: mostly small, sometimes huge.
    pub fn count(&mut self) -> u32 {
        match self.u8() % 6 {
            0 => 0,
            1 => 1,
            2 | 3 => u32::from(self.u8() % 8),
            4 => u32::MAX,
            _ => self.u32(),
        }
    }

    /// A float including every value a careless caller could pass.
    pub fn float(&mut self) -> f64 {
        match self.u8() % 14 {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => -1.0,
            6 => 1.0,
            7 => 0.9,
            8 => f64::from(self.u16()) / 1000.0,
            9 => f64::from_bits(self.u64()),
            10 => 5e-324,
            11 => 1e300,
            12 => 1.0 + f64::EPSILON,
            _ => f64::from(self.u8()) / 256.0,
        }
    }
}
