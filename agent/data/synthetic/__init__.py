"""Generated brain-MRI-like data with tumour-like lesions, for the demo, the tests and the benchmarks.

Real hospital data never ships with the product, yet a federated-learning platform has to be shown
working on something that behaves like it: several sites whose scanners, protocols and patients
differ (non-IID data), a segmentation target that a small model can learn, DICOM series that look
like a PACS export, and made-up patient identities that let tests prove identity never leaves a site.

Everything is a pure function of ``(seed, site index, subject index)``: a site's profile (scanner,
protocol, patient population) depends on ``(seed, site index)`` only, a subject on the three of them,
so adding sites or subjects never changes the ones already generated.

Geometry follows DICOM: arrays are ``(I, J, K)`` = (column index, row index, slice index), axial
slices (``ImageOrientationPatient`` = 1,0,0,0,1,0), slices stacked along +S. The NIfTI affine is the
RAS+ form of exactly the geometry written into the DICOM headers, so a correct DICOM reader and the
NIfTI file give the same grid.

The modules, each by what it makes (import from them; this package re-exports nothing):

- ``seeding``: the random stream of a key, the limits on seeds, indices and sizes, the one error;
- ``sites``: a site's profile: scanner, protocol, patient population;
- ``identities``: made-up patient identities;
- ``anatomy``: the exam's slice grid and the head on it: tissue fractions and the label map;
- ``rendering``: the image of that anatomy on a site's scanner, per modality;
- ``subjects``: one generated subject, the anatomy rendered for every modality asked for;
- ``writers``: a subject as NIfTI files or as DICOM series, byte-identical for the same subject.

Laying sites out as a federation (agent configs, the coordinator's federation file, a plan) is not
data: it lives with the demo, in ``coordinator.demo_federation``.
"""
