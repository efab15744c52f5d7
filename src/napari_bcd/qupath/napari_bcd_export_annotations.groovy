/**
 * napari-bcd for QuPath 0.5 / 0.6: export the annotations of the project's images as GeoJSON.
 *
 * Run with Automate > Script editor > Run for project.  Each image's annotations are written to
 * <project>/napari-bcd-annotations/<image name>.geojson, ready for
 *     napari-bcd export-patches SLIDE <image name>.geojson --out patches/
 *     napari-bcd train patches/ --out model.safetensors
 * Classes are written as QuPath names them; napari-bcd maps Normal, Benign, In situ carcinoma and
 * Invasive carcinoma (and their usual aliases), and --label Tumor=Invasive maps others.
 */
import qupath.lib.common.GeneralTools

def annotations = getAnnotationObjects().findAll { it.getROI() != null && it.getROI().isArea() }
if (annotations.isEmpty()) {
    println "napari-bcd: no area annotations on ${getProjectEntry()?.getImageName()}"
    return
}
def dir = buildFilePath(PROJECT_BASE_DIR, "napari-bcd-annotations")
mkdirs(dir)
def name = GeneralTools.stripInvalidFilenameChars(GeneralTools.getNameWithoutExtension(getProjectEntry().getImageName()))
def path = buildFilePath(dir, name + ".geojson")
exportObjectsToGeoJson(annotations, path, "FEATURE_COLLECTION")
println "napari-bcd: ${annotations.size()} annotation(s) -> ${path}"
